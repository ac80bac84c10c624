"""`estimate(plan, model)`: per-GPU memory of one step, from a cached symbolic timeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.architecture import ModelSpec
from planner.engine import generation, training
from planner.engine.runtime import cublas_workspace_bytes, reserved_bytes
from planner.engine.timeline import CompiledTimeline
from planner.result import CATEGORIES, MemoryEstimate
from planner.specs import Plan

if TYPE_CHECKING:
    from planner.gpus import GPUSpec

DEFAULT_CUDA_CONTEXT = 547_356_672  # measured H200 context: (139.80 - 139.29) GiB, rounded to 2 MiB

# Plan fields that change the timeline's shape (everything but the batch and lengths).
_SHAPE_FIELDS = ("task", "method", "precision", "optimizer", "grad_ckpt", "attn", "lora_rank",
                 "lora_targets", "quant", "double_quant", "kbit_prep")

_cache: dict[tuple, tuple] = {}


def _key(plan: Plan, spec: ModelSpec) -> tuple:
    d = plan.__dict__
    return (id(spec), spec.id, spec.num_params) + tuple(d[f] for f in _SHAPE_FIELDS)


def _compiled(plan: Plan, spec: ModelSpec) -> tuple:
    key = _key(plan, spec)
    hit = _cache.get(key)
    if hit is None or hit[0] is not spec:
        if plan.task == "generate":
            built = generation.build(spec, plan)
        else:
            built = training.build(spec, plan)
        hit = (spec, *built)
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = hit
    return hit


def estimate(plan: Plan, model: ModelSpec, gpu: "GPUSpec | None" = None) -> MemoryEstimate:
    """Per-GPU memory of one step of `plan` on `model`; `gpu` sets the CUDA context and the cuBLAS
    workspace size (without it: the measured H200 context and sm90's workspace)."""
    _, timeline, res, extra = _compiled(plan, model)
    context = gpu.cuda_context_bytes if gpu is not None else DEFAULT_CUDA_CONTEXT
    cc = gpu.compute_capability if gpu is not None else "9.0"
    if plan.task == "generate":
        return generation.evaluate(timeline, res, extra, plan, model, context, cublas_workspace_bytes(cc, 1))
    tokens = plan.batch * plan.seq
    return finish(timeline, extra, tokens, plan.seq, context, cublas_workspace_bytes(cc, 2))


def finish(timeline: CompiledTimeline, extra: dict[str, int], tokens: float, seq: float,
           cuda_context_bytes: int, workspace: int, kv: dict[str, int] | None = None) -> MemoryEstimate:
    moment, peak, phases = timeline.evaluate(tokens, seq)
    breakdown = {c: 0 for c in CATEGORIES}
    for cat, s in moment.parts.items():
        breakdown[cat] += int(s.c + s.t * tokens + s.q * tokens * seq)
    if kv:
        for cat, b in kv.items():
            breakdown[cat] += b
    breakdown["other"] += workspace
    total = sum(breakdown.values())
    details = {k: int(s.c + s.t * tokens + s.q * tokens * seq) for k, s in moment.details.items()}
    details["cublas_workspace"] = workspace
    for k, v in extra.items():
        if k != "paged_optimizer_states":
            details[k] = v
    reserved = reserved_bytes(total, sum(1 for v in breakdown.values() if v))
    device_items = {"allocator_overhead": reserved - total, "cuda_context": cuda_context_bytes}
    outside = {"paged_optimizer_states": extra["paged_optimizer_states"]} if "paged_optimizer_states" in extra else {}
    return MemoryEstimate(
        peak_allocated_bytes=total,
        reserved_bytes=reserved,
        device_bytes=reserved + cuda_context_bytes,
        peak_phase=moment.phase,
        breakdown=breakdown,
        details=details,
        device_items=device_items,
        outside_allocator=outside,
        phases={k: v + workspace for k, v in phases.items()},
    )
