"""A user's `step(model, optimizer, batch)` as a technique's `step(ctx)` (planner.dryrun), with the
phases marked as the tracker sees a plain step."""

from __future__ import annotations

from typing import Any, Callable


def phase_hooks(model: Any, opt: Any, ctx: Any) -> list[Any]:
    """Phases as the tracker sees a plain step: the model's forward starts 'forward', a backward()
    'backward', the optimizer's step() 'optimizer'."""
    import torch

    handles = [model.register_forward_pre_hook(lambda *_: ctx._enter_phase("forward"))]
    if opt is not None:
        handles.append(opt.register_step_pre_hook(lambda *_: ctx._enter_phase("optimizer")))
    real_backward = torch.Tensor.backward

    def backward(self: Any, *args: Any, **kwargs: Any) -> Any:
        ctx._enter_phase("backward")
        return real_backward(self, *args, **kwargs)

    torch.Tensor.backward = backward  # type: ignore[method-assign]

    class _Restore:
        def remove(self) -> None:
            torch.Tensor.backward = real_backward  # type: ignore[method-assign]

    handles.append(_Restore())
    return handles


def as_ctx_step(fn: Callable[..., Any], role: str) -> Callable[[Any], None]:
    """step(model, optimizer, batch) as a step(ctx)."""

    def step(ctx: Any) -> None:
        model = ctx.model(role)
        opt = ctx.optimizer(role)
        ids = ctx.token_ids(ctx.plan.batch, ctx.plan.seq)
        batch = {"input_ids": ids, "labels": ids}
        del ids
        hooks = phase_hooks(model, opt, ctx)
        try:
            with ctx.autocast():
                fn(model, opt, batch)
        finally:
            for h in hooks:
                h.remove()

    return step
