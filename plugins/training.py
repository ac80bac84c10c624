"""Built-in technique `sft`: supervised fine-tuning with transformers' causal-LM loss.

The program (shared/notes/heldout-protocol.md): `out = model(input_ids=ids, labels=ids)`,
`out.loss.backward()`, `opt.step()`, `opt.zero_grad(set_to_none=True)`, full, LoRA or QLoRA. With
`grad_accum` > 1 a step runs that many micro-batches (`out = model(...)`, `(out.loss / grad_accum).backward()`)
before its optimizer step, as a loop written around the same statements does: the gradients persist
between micro-batches, and `out` is rebound once the next micro-batch's forward returns.
"""

from __future__ import annotations

from planner.hookspecs import hookimpl
from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload

__version__ = "0.1.0"


def sft_workload(plan, model) -> Workload:
    return Workload(
        technique="sft",
        models=(ModelUse("model", model, plan, trainable=True, ref=plan.model),),
        phases=(Phase("train", "train_step", "model", plan.batch, plan.seq, micro_batches=plan.grad_accum),),
    )


def sft_step(ctx) -> None:
    """One training step, as a user's loop runs it (module doc: `grad_accum` micro-batches)."""
    model = ctx.model("model")
    opt = ctx.optimizer("model")
    for _ in range(ctx.plan.grad_accum):
        ids = ctx.token_ids(ctx.plan.batch, ctx.plan.seq)
        ctx.keep(ids, "ids")  # `ids = ...`: the previous micro-batch's ids go once the new ones exist
        with ctx.phase("forward"):
            out = model(input_ids=ids, labels=ids)
        # `out` (and its logits) is held until the step ends, or until the next micro-batch rebinds it
        ctx.keep(out)
        with ctx.phase("backward"):
            ctx.backward(out.loss)
        del out, ids  # held by ctx.keep
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


SFT = Technique(
    name="sft",
    kind="training",
    description="supervised fine-tuning (causal-LM loss via labels=): full, LoRA or QLoRA",
    workload=sft_workload,
    step=sft_step,
    plan_fields=("seq", "grad_accum", "grad_ckpt", "optimizer"),
)


@hookimpl
def register_techniques(register) -> None:
    register(SFT)
