"""`estimate_distributed(plan, layout, spec, gpu)`: a plan on many GPUs, whatever its technique.

sft goes to planner.engine.distributed.ranks (the per-rank model of one training step); every other
technique (rm, dpo, distill, grpo, ppo, a plugin's) to planner.engine.distributed.techniques, which
applies the same per-rank model to each model and phase of the technique's Workload.
"""

from __future__ import annotations

from planner.architecture import ModelSpec
from planner.engine import compute
from planner.engine.distributed.layout import Layout, LayoutError
from planner.engine.distributed.ranks import ActivationModel, DistributedEstimate, estimate_sft
from planner.engine.distributed.techniques import estimate_technique
from planner.gpus import GPUSpec
from planner.specs import Plan


def estimate_distributed(plan: Plan, layout: Layout, spec: ModelSpec, gpu: GPUSpec, *,
                         activations: ActivationModel = "engine", style: compute.Style = "hf",
                         eff: compute.Efficiency | None = None) -> DistributedEstimate:
    """Per-rank memory, collectives and step time of `plan` laid out as `layout`.

    `plan.batch` is the micro-batch per GPU and must equal `layout.micro_batch` (use
    layout.layout_for_plan to build one from a plan); `plan.grad_accum` is ignored in favour of the
    layout's global batch. `style` picks the elementwise-kernel model ("hf": transformers' eager ops,
    "megatron": Megatron-LM's fused kernels); `activations` the activation model.
    """
    if plan.batch != layout.micro_batch:
        raise LayoutError(f"batch: the plan's micro-batch {plan.batch} differs from the layout's {layout.micro_batch}")
    run = estimate_sft if plan.task == "sft" else estimate_technique
    return run(plan, layout, spec, gpu, activations=activations, style=style, eff=eff)
