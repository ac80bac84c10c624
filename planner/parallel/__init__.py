"""Distributed training: layouts (DP/TP/SP/PP, ZeRO, FSDP, offload), per-rank memory, collectives,
and step time. Pure Python (no torch); the engine integrates it through `estimate_distributed`.

    from planner.parallel import layout_for_plan, estimate_distributed
    lay = layout_for_plan(plan.batch, plan.grad_accum, gpus=16, gpus_per_node=8, zero=3, tp=2)
    est = estimate_distributed(plan, lay, spec, gpu)
"""

from planner.parallel.estimate import (
    CollectiveReport, DistributedEstimate, RankMemory, StepTime, estimate_distributed,
)
from planner.parallel.layout import Layout, LayoutError, layout_for_plan, make_layout

__all__ = [
    "CollectiveReport", "DistributedEstimate", "Layout", "LayoutError", "RankMemory", "StepTime",
    "estimate_distributed", "layout_for_plan", "make_layout",
]
