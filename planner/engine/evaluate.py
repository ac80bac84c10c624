"""A compiled timeline evaluated at one batch and length: the MemoryEstimate of one phase."""

from __future__ import annotations

from planner.engine.runtime import reserved_bytes
from planner.engine.timeline import CompiledTimeline
from planner.result import CATEGORIES, MemoryEstimate


def finish(timeline: CompiledTimeline, extra: dict[str, int], tokens: float, seq: float,
           cuda_context_bytes: int, workspace: int, kv: dict[str, int] | None = None,
           carried: int = 0) -> MemoryEstimate:
    """Evaluate a compiled timeline; `carried` bytes (an earlier phase's tensors this phase still
    references) are live at every moment."""
    moment, peak, phases = timeline.evaluate(tokens, seq)
    if carried:
        phases = {k: v + carried for k, v in phases.items()}
    breakdown = {c: 0 for c in CATEGORIES}
    for cat, s in moment.parts.items():
        breakdown[cat] += int(s.at(tokens, seq))
    if kv:
        for cat, b in kv.items():
            breakdown[cat] += b
    breakdown["activations"] += carried
    breakdown["other"] += workspace
    total = sum(breakdown.values())
    details = {k: int(s.at(tokens, seq)) for k, s in moment.details.items()}
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
