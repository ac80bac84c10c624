"""Your own training step, dry-run at full scale (`planner dryrun FILE.py:FUNC`, `measure(step, plan)`).

The plan's models (and adapters, quantization, optimizers) are built as `planner validate --backend
dry-run` builds them, on fake tensors (or real ones on the CPU for tiny configs: `device="cpu"`), and
the user's function runs `steps` times under the same tracker, unmodified, with CUDA's behaviour
(foreach optimizers, SDPA without a mask, CUDA's autocast lists, bitsandbytes' dispatch). Host reads
of fake values (`loss.item()`, an `if` on a tensor) are answered from a narrow real run of the same
function recorded first (tiny width, same vocabulary), as a generation's are.

Two signatures:
- `step(ctx)`: a technique's step (planner.backends.context.StepContext): `ctx.model(role)`,
  `ctx.optimizer(role)`, `ctx.token_ids(batch, seq)`, `ctx.phase(name)`, `ctx.generate(...)`, with the
  models of the plan's technique (`--task`: sft's "model", dpo's "policy" and "reference", distill's
  "student" and "teacher"...);
- `step(model, optimizer, batch)`: the trained model of the plan's technique, its optimizer and a
  batch `{"input_ids": ids, "labels": ids}` of random token ids (batch x seq), the step run under the
  plan's autocast (mixed precision, QLoRA's bf16 compute) as the HF Trainer runs one. Phases are
  marked as the tracker sees them: a forward of the model starts "forward" (its output head
  "loss"), a `backward()` "backward", the optimizer's `step()` "optimizer".

A function's locals go when it returns, as in a user's loop written as a function (the measured
programs release a step's outputs when it ends: docs/allocator.md).

The user's file is imported and run in this process, as any Python script the user runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from planner.errors import PlannerInputError, did_you_mean, one_line


class DryrunError(PlannerInputError):
    """The user's step cannot be dry-run (message: one line, naming the file and line where it applies)."""


class DryrunResult(BaseModel):
    """What the dry run of a user's step measured, and the catalog technique's estimate beside it."""

    step: str
    signature: str
    task: str
    device: str
    steps: int
    peak_allocated_bytes: int
    reserved_bytes: int | None = None
    breakdown: dict[str, int] = Field(default_factory=dict)
    details: dict[str, int] = Field(default_factory=dict)
    peak_phase: str | None = None
    peak_op: str | None = None
    phases: dict[str, int] = Field(default_factory=dict)
    estimate_peak_allocated_bytes: int | None = None
    estimate_reserved_bytes: int | None = None
    estimate_breakdown: dict[str, int] = Field(default_factory=dict)
    estimate_note: str = ""
    wall_s: float = 0.0
    versions: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    @property
    def difference(self) -> float | None:
        """(measured - estimate) / estimate of peak allocated, where there is an estimate."""
        e = self.estimate_peak_allocated_bytes
        return (self.peak_allocated_bytes - e) / e if e else None


def load_step(ref: str) -> Callable[..., Any]:
    """`path/to/file.py:function` -> the function (DryrunError for a missing file or function)."""
    path, sep, name = ref.rpartition(":")
    if not sep or not path or not name:
        raise DryrunError(f"step: give FILE.py:FUNCTION (got '{ref}')")
    file = Path(path)
    if not file.is_file():
        raise DryrunError(f"step: no such file '{path}'")
    module_name = f"_planner_step_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise DryrunError(f"step: cannot import '{path}' (a Python file ending in .py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's module failed at import: its line, not the harness's
        raise DryrunError(_user_error(e, file, "importing it")) from None
    fn = getattr(module, name, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module_name]
        raise DryrunError(f"step: '{path}' has no function '{name}'{did_you_mean(name, names)}"
                          + (f" (functions: {', '.join(names)})" if names and not did_you_mean(name, names) else ""))
    if not callable(fn):
        raise DryrunError(f"step: '{name}' in '{path}' is not a function")
    return fn


def signature_of(fn: Callable[..., Any]) -> str:
    """'ctx' for step(ctx), 'model' for step(model, optimizer, batch); DryrunError otherwise."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        raise DryrunError(f"step: cannot read the signature of {getattr(fn, '__name__', fn)!r}") from None
    if len(params) == 1:
        return "ctx"
    if len(params) == 3:
        return "model"
    got = ", ".join(p.name for p in params)
    raise DryrunError(f"step: {getattr(fn, '__name__', 'the function')}({got}) must take (ctx) or "
                      "(model, optimizer, batch)")


def _user_error(e: BaseException, file: Path | None, doing: str) -> str:
    """One line: where in the user's file the exception came from, and what it says."""
    frames = traceback.extract_tb(e.__traceback__)
    where = ""
    if file is not None:
        mine = [f for f in frames if Path(f.filename).resolve() == file.resolve()]
        if mine:
            where = f"{file}:{mine[-1].lineno}: "
    msg = one_line(str(e)) or type(e).__name__
    hint = ""
    name = type(e).__name__
    if name in ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedOperatorException"):
        hint = " (fake tensors cannot answer this; run it on a tiny config with --device cpu, or move it out of the step)"
    return f"{where}{name} while {doing}: {msg}{hint}"


def measure(step: "Callable[..., Any] | str", plan: Any, steps: int = 2, device: str = "fake",
            alloc_conf: Any = None, estimate: bool = True) -> DryrunResult:
    """Dry-run a user's step for `plan` (module doc); `step` a function or 'FILE.py:FUNCTION'."""
    from planner.backends import check_backend
    from planner.backends.allocation import answer, trace_options
    from planner.backends.tracked import run_tracked
    from planner.models import load_model, model_config
    from planner.plugins import technique

    label = step if isinstance(step, str) else f"{getattr(step, '__module__', '?')}.{getattr(step, '__name__', '?')}"
    fn = load_step(step) if isinstance(step, str) else step
    file = Path(step.rpartition(":")[0]) if isinstance(step, str) else _source_file(fn)
    kind = signature_of(fn)
    if steps < 1:
        raise DryrunError(f"steps: must be >= 1 (got {steps})")
    check_backend("dry-run" if device == "fake" else "real", device)
    tech = technique(plan.task)
    spec = load_model(plan.model)
    workload = tech.workload(plan, spec)
    if kind == "model":
        trained = [u.role for u in workload.models if u.trainable]
        if len(trained) != 1 or len(workload.models) != 1:
            roles = ", ".join(u.role for u in workload.models)
            raise DryrunError(f"step: step(model, optimizer, batch) takes the one trained model, and task {plan.task} "
                              f"has {roles}: write step(ctx) and ask ctx.model(role) for each")
        if "seq" not in tech.plan_fields:
            raise DryrunError(f"step: task {plan.task} has no sequence length for the batch: write step(ctx)")
        from planner.backends.user_step import as_ctx_step

        ctx_step = as_ctx_step(fn, trained[0])
    else:
        ctx_step = fn
    shim = dataclasses.replace(tech, step=ctx_step)
    try:
        meas = run_tracked(shim, plan, model_config(plan.model), steps=steps, device=device,
                           trace=trace_options(plan), host_reads=True)
    except PlannerInputError:
        raise
    except Exception as e:  # the user's step failed: its line and message, not the harness's traceback
        raise DryrunError(_user_error(e, file, "running the step")) from None
    cats = meas.breakdown or {}
    # nothing but its batch: no phase began (no forward, backward or optimizer step) and nothing was computed
    if not meas.phases and not any(cats.get(k, 0) for k in ("temporaries", "gradients", "optimizer_states", "kv_cache")):
        raise DryrunError(f"step: {label} allocated nothing in {steps} step(s) beyond the models it was given "
                          "(does it run the model?)")
    reserved = None
    if meas.allocation_trace:
        from planner.engine.alloc_conf import AllocatorConfig

        reserved = answer(meas.allocation_trace, plan, alloc_conf or AllocatorConfig()).reserved_bytes
    out = DryrunResult(
        step=label, signature="step(ctx)" if kind == "ctx" else "step(model, optimizer, batch)", task=plan.task,
        device=device, steps=steps, peak_allocated_bytes=meas.peak_allocated_bytes or 0, reserved_bytes=reserved,
        breakdown=cats, details=meas.details, peak_phase=meas.peak_phase, peak_op=meas.peak_op, phases=meas.phases,
        wall_s=meas.wall_s, versions=meas.versions, notes=meas.notes)
    if estimate:
        _with_estimate(out, plan, spec)
    return out


def _source_file(fn: Callable[..., Any]) -> Path | None:
    try:
        return Path(inspect.getsourcefile(fn) or "")
    except TypeError:
        return None


def _with_estimate(out: DryrunResult, plan: Any, spec: Any) -> None:
    """The catalog technique's estimate for the same plan (its own program), beside the user's."""
    from planner.engine import estimate
    from planner.gpus import resolve_gpu

    gpu = resolve_gpu(plan.gpu or "h100-sxm", plan.gpu_memory)
    try:
        est = estimate(plan, spec, gpu)
    except ValueError as e:
        out.estimate_note = f"no estimate: {one_line(e)}"
        return
    # the dry run cannot see the cuBLAS workspace: like with like, as planner validate compares them
    workspace = est.details.get("cublas_workspace", 0)
    out.estimate_peak_allocated_bytes = est.peak_allocated_bytes - workspace
    out.estimate_reserved_bytes = est.reserved_bytes
    out.estimate_breakdown = {k: v - (workspace if k == "other" else 0) for k, v in est.breakdown.items()}
    out.estimate_note = (f"the {plan.task} technique's own program (planner fit's estimate"
                         f"{'' if plan.gpu else ', on h100-sxm'}, without the cuBLAS workspace a dry run cannot see); "
                         "its reserved by the rounding model")
