"""The serving engine's iteration time from the same device profile `fit` prices with.

The simulator needs an iteration time in closed form (planner.serving.roofline: max of a compute
line and a memory line, plus a fixed overhead), so it takes three figures from the profile rather
than pricing every op of every iteration:
- compute efficiency: the profile's large-matmul rate (at 1 TFLOP per op) over the card's peak;
- memory efficiency: the profile's memory rate at 1 GB moved over the datasheet bandwidth;
- the fixed overhead of one iteration, which is where the engines differ:
  * `vllm`: vLLM V1 captures decode iterations in CUDA graphs and schedules in C++-backed Python:
    DEFAULT_ITERATION_OVERHEAD_S (1 ms: vLLM's decode on an H100 runs about 1 ms slower than the
    weight read; planner.serving.roofline), unchanged by the host profile;
  * `transformers`: transformers' continuous batching runs every iteration eagerly: the host time of
    one decode forward of the replayed program (planner.engine.program.generate_program's decode
    stretches, priced by the profile's host costs: every op's dispatch, the modules' and layers'
    Python, generate's per-step Python), which bounds an eager iteration from below.
"""

from __future__ import annotations

from planner.serving.roofline import DEFAULT_ITERATION_OVERHEAD_S
from planner.serving.specs import Calibration

ENGINES = ("vllm", "transformers")


def calibration_from_profile(profile, gpu, spec, engine: str = "vllm", base: Calibration | None = None) -> Calibration:
    """A Calibration with the profile's efficiencies and the engine's iteration overhead; fields
    `base` sets (a calibration file, flags) win."""
    from planner.engine.cost import price
    from planner.engine.program import generate_program
    from planner.specs import Plan

    base = base or Calibration()
    peak = (gpu.bf16_tflops or gpu.fp16_tflops or 0.0) * 1e12
    bw = (gpu.mem_bandwidth_gb_per_s or 0.0) * 1e9
    ce = min(profile.matmul_curve("bf16").rate(1e12) / peak, 1.0) if peak else None
    me = min(profile.memory.rate(1e9) / bw, 1.0) if bw else None
    overhead = DEFAULT_ITERATION_OVERHEAD_S
    if engine == "transformers":
        prog = generate_program(spec, Plan(model=spec.id, task="generate"))
        overhead = sum(price(s.ops, 1, 1, profile, s.mode).host_s * s.repeat for s in prog.phases["decode"])
    return base.model_copy(update={
        "compute_efficiency": base.compute_efficiency if base.compute_efficiency is not None else ce,
        "memory_efficiency": base.memory_efficiency if base.memory_efficiency is not None else me,
        "iteration_overhead_s": base.iteration_overhead_s if base.iteration_overhead_s is not None else overhead,
        "source": base.source or f"device profile {profile.id} ({engine} engine)",
    })
