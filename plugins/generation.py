"""Built-in technique `generate`: transformers' greedy `generate` with its default dynamic cache."""

from __future__ import annotations

from planner.hookspecs import hookimpl
from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload

__version__ = "0.1.0"


def generate_workload(plan, model) -> Workload:
    return Workload(
        technique="generate",
        models=(ModelUse("model", model, plan, trainable=False, ref=plan.model),),
        phases=(Phase("generate", "generate", "model", plan.batch, plan.prompt_len, plan.new_tokens),),
    )


def generate_step(ctx) -> None:
    """model.generate(ids, attention_mask=ones, max_new_tokens=n, min_new_tokens=n, do_sample=False)."""
    model = ctx.model("model")
    p = ctx.plan
    ids = ctx.token_ids(p.batch, p.prompt_len)
    ctx.generate(model, ids, p.new_tokens)


GENERATE = Technique(
    name="generate",
    kind="inference",
    description="greedy generation with transformers' generate and its dynamic KV cache",
    workload=generate_workload,
    step=generate_step,
    plan_fields=("prompt_len", "new_tokens"),
)


@hookimpl
def register_techniques(register) -> None:
    register(GENERATE)
