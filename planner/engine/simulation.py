"""Reserved memory and the out-of-memory verdict of a plan from the engine's own allocation trace
(planner.engine.steptrace) run through the simulated caching allocator (planner.engine.allocator):
what `planner fit` answers, with no torch and no dry run.

- reserved: the simulation's peak on an unlimited card (what `max_memory_reserved` reports on a large one);
- the verdict: the same trace under the card's memory less its CUDA context, with the allocator's
  free-and-retry; the smallest allocator memory that runs it and how much of it is fragmentation;
- where it does not fit, the allocator settings under which it does (each replayed under the card).

The symbolic trace is built once per plan shape (everything but the batch and the lengths) and card
kind (cuBLAS workspace, SDPA backward kernel), then evaluated at the plan's numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.engine.alloc_conf import AllocatorConfig
from planner.engine.allocator import AllocatorAnswer, simulate
from planner.engine.steptrace import SymbolicTrace, TraceOptions, TraceUnsupported, workload_trace

if TYPE_CHECKING:
    from planner.gpus import GPUSpec

__all__ = ["TraceUnsupported", "allocator_capacity", "plan_trace", "simulate_plan"]

_cache: dict[tuple, tuple[Any, SymbolicTrace]] = {}

# What fit simulates: a generation's trace has every decode step of every layer (about 90 events per
# layer and step, two generate calls), which a long generation makes millions of events long: built and
# replayed in pure Python that is seconds to minutes, so fit keeps the rounding model past this many
# (planner validate simulates any length from the dry run's trace)
FIT_MAX_EVENTS = 200_000
EVENTS_PER_DECODE_LAYER = 90


def trace_options(gpu: "GPUSpec | None") -> TraceOptions:
    """The trace's workspace and SDPA kernel for the plan's card (sm90's without one), as the
    dry run's tracker records them (planner.backends.allocation.trace_options)."""
    return TraceOptions.for_card(gpu.compute_capability if gpu is not None else "9.0")


def allocator_capacity(gpu: "GPUSpec") -> int:
    """What the caching allocator can take on the card: its memory less the CUDA context."""
    return gpu.memory_bytes - gpu.cuda_context_bytes


def plan_trace(plan: Any, model: Any, gpu: "GPUSpec | None" = None, coded: bool = False,
               max_events: int | None = None) -> Any:
    """The plan's allocation trace (planner.engine.allocator's events; `coded`: as its CodedTrace),
    from the cached symbolic one. Raises TraceUnsupported where the engine cannot trace the plan yet,
    or (with `max_events`) where a generation's trace would be longer than that."""
    from planner.plugins import technique

    workload = technique(plan.task).workload(plan, model)
    if max_events is not None:
        for ph in workload.phases:
            if ph.kind != "generate":
                continue
            spec = workload.model(ph.role).spec
            events = 2 * ph.new_tokens * spec.num_layers * EVENTS_PER_DECODE_LAYER
            if events > max_events:
                raise TraceUnsupported(f"a generation of {ph.new_tokens} new tokens over {spec.num_layers} layers: "
                                       f"about {events:,} allocation events (every decode step of every layer), "
                                       f"more than fit simulates ({max_events:,}); planner validate simulates it "
                                       "from the dry run")
    options = trace_options(gpu)
    # one sequence per micro-batch has a trace of its own (steptrace.workload_trace)
    key = (workload_key(workload), options, workload.phases[0].batch == 1)
    hit = _cache.get(key)
    if hit is None or hit[0] is not workload.models[0].spec:
        built = workload_trace(workload, options)
        if len(_cache) > 256:
            _cache.clear()
        hit = (workload.models[0].spec, built)
        _cache[key] = hit
    numbers = workload_numbers(workload)
    return hit[1].coded(*numbers) if coded else hit[1].at(*numbers)


def workload_key(workload: Any) -> tuple:
    """What decides a workload's trace but its numbers: technique, models and their settings."""
    from planner.engine.estimate import _SHAPE_FIELDS

    models = tuple((m.role, id(m.spec), m.spec.id, m.spec.num_params, m.trainable, m.setup.grad_accum)
                   + tuple(getattr(m.setup, f) for f in _SHAPE_FIELDS) for m in workload.models)
    phases = tuple((ph.name, ph.kind, ph.role, ph.loss, ph.passes, ph.adapters, ph.autocast, ph.new_tokens)
                   for ph in workload.phases)
    return (workload.technique, models, phases)


def workload_numbers(workload: Any) -> tuple[int, int]:
    """(B, S) of the trace: the first phase's sequences and length."""
    ph = workload.phases[0]
    return ph.batch, ph.seq


def simulate_plan(plan: Any, model: Any, gpu: "GPUSpec", config: AllocatorConfig | None = None) -> AllocatorAnswer:
    """The simulated allocator's answer for the plan on its card: reserved, the verdict, the smallest
    card and, where it does not fit, the settings that make it fit."""
    trace = plan_trace(plan, model, gpu, coded=True, max_events=FIT_MAX_EVENTS)
    return simulate(trace, config or AllocatorConfig(), capacity_bytes=allocator_capacity(gpu))
