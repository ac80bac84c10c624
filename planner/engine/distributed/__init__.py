"""Distributed training: layouts (DP/TP/SP/PP, ZeRO, FSDP, offload), per-rank memory, collectives,
and step time. Pure Python (no torch): the single-GPU engine's replay, composed per rank with
sharding and collectives, through `estimate_distributed`.

    from planner.engine.distributed import layout_for_plan, estimate_distributed
    lay = layout_for_plan(plan.batch, plan.grad_accum, gpus=16, gpus_per_node=8, zero=3, tp=2)
    est = estimate_distributed(plan, lay, spec, gpu)
"""

from planner.engine.distributed.estimate import estimate_distributed
from planner.engine.distributed.ranks import CollectiveReport, DistributedEstimate, RankMemory, StepTime
from planner.engine.distributed.layout import Layout, LayoutError, layout_for_plan, make_layout

__all__ = [
    "CollectiveReport", "DistributedEstimate", "Layout", "LayoutError", "RankMemory", "StepTime",
    "estimate_distributed", "layout_for_plan", "make_layout",
]
