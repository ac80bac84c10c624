"""planner-score: an example third-party planner plugin.

Adds the technique `score`: the log-probability of every token of given sequences, computed in one
no-grad forward (evaluation, perplexity, reference log-probs). It uses only the public hooks, as any
plugin would: `pip install ./examples/planner-score`, then `planner plugins`, `planner fit --task score`,
`planner validate --task score`.
"""

from __future__ import annotations

from planner.hookspecs import hookimpl
from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload

__version__ = "0.1.0"


def score_workload(plan, model) -> Workload:
    return Workload(
        technique="score",
        models=(ModelUse("model", model, plan, trainable=False, ref=plan.model),),
        phases=(Phase("score", "score", "model", plan.batch, plan.seq),),
    )


def score_step(ctx) -> None:
    import torch

    model = ctx.model("model")
    ids = ctx.token_ids(ctx.plan.batch, ctx.plan.seq)
    with ctx.phase("forward"), torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])
    ctx.keep(logp)


SCORE = Technique(
    name="score",
    kind="inference",
    description="log-probabilities of given tokens in one no-grad forward (evaluation)",
    workload=score_workload,
    step=score_step,
    plan_fields=("seq",),
)


@hookimpl
def register_techniques(register) -> None:
    register(SCORE)
