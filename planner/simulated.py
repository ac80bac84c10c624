"""`fit`'s figures from the simulated caching allocator (planner.engine.simulation): reserved, the
verdict, and the searches (suggestions, limits) judged by it.

The searches try many candidate plans; each is estimated by the engine (microseconds) with its
reserved scaled by the plan's own simulated-to-estimated ratio, and only the finalists are simulated:
those that change the batch or a length (the same trace shape, so the cached trace serves them) are
replayed under the card (a verdict needs one or two replays: on an unlimited card, then under the card
when the first asks for more), and where a finalist does not fit (or a limit could go further), the
largest value that does is searched from the estimate rescaled by each replay's figure, a handful of
replays rather than a bisection's (`_simulated_largest`); a length is searched over the length grid
(planner.length_grid: a step of at most 1/64 of the value), a batch over every integer
(`_largest_fitting`). Finalists of another shape (checkpointing, LoRA, another optimizer) would each
need a trace built: they keep the scaled figure and say so (`simulated`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner import length_grid
from planner.engine.alloc_conf import AllocatorConfig
from planner.result import MemoryEstimate
from planner.specs import MAX_COUNT, Plan

if TYPE_CHECKING:
    from planner.engine.allocator import AllocatorAnswer
    from planner.gpus import GPUSpec


def simulated(plan: Plan, model: Any, gpu: "GPUSpec", config: AllocatorConfig) -> "tuple[AllocatorAnswer | None, str]":
    """The allocator's answer for the plan on its card, or None and why the engine cannot trace it."""
    from planner.engine.simulation import TraceUnsupported, simulate_plan

    try:
        return simulate_plan(plan, model, gpu, config), ""
    except TraceUnsupported as e:
        return None, str(e)


def with_simulated(est: MemoryEstimate, answer: "AllocatorAnswer", gpu: "GPUSpec") -> MemoryEstimate:
    """The estimate with reserved (and device) from the simulation."""
    reserved = answer.reserved_bytes
    items = dict(est.device_items)
    items["allocator_overhead"] = reserved - est.peak_allocated_bytes
    items["cuda_context"] = gpu.cuda_context_bytes
    return est.model_copy(update={"reserved_bytes": reserved, "device_bytes": reserved + gpu.cuda_context_bytes,
                                  "device_items": items})


def verdict(plan: Plan, model: Any, gpu: "GPUSpec", config: AllocatorConfig,
            fits_only: bool = False) -> "tuple[int, bool] | None":
    """(reserved, fits) of the plan's trace on the card, by one or two replays (reserved on an unlimited
    card, then under the card when that asks for more); None where it is not traced. `fits_only`: one
    replay under the card (reserved is then the most that run held)."""
    from planner.engine.allocator import replay
    from planner.engine.simulation import FIT_MAX_EVENTS, TraceUnsupported, allocator_capacity, plan_trace

    try:
        trace = plan_trace(plan, model, gpu, coded=True, max_events=FIT_MAX_EVENTS)
    except (TraceUnsupported, ValueError):
        return None
    capacity = allocator_capacity(gpu)
    if fits_only:
        run = replay(trace, config, capacity_bytes=capacity)
        return run.max_reserved_bytes, run.fits
    free = replay(trace, config)
    if free.max_reserved_bytes <= capacity:
        return free.peak_reserved_bytes, True
    return free.peak_reserved_bytes, replay(trace, config, capacity_bytes=capacity).fits


def same_shape(a: Plan, b: Plan) -> bool:
    """Plans whose traces differ only in their numbers (batch and the lengths a trace's sizes take;
    not the new tokens: a generation's trace has a decode step per token). One sequence per
    micro-batch has a trace of its own (planner.engine.steptrace.workload_trace)."""
    da, db = a.model_dump(), b.model_dump()
    return all(da[k] == db[k] for k in da if k not in NUMBERS) and (a.batch == 1) == (b.batch == 1)


NUMBERS = ("batch", "seq", "prompt_len")


def _largest(lo_fits: int, hi_fails: int, fits_at: Any) -> int:
    """The largest v in (lo_fits, hi_fails) that fits, by bisection (lo_fits when none does)."""
    while hi_fails - lo_fits > 1:
        mid = (lo_fits + hi_fails) // 2
        if fits_at(mid):
            lo_fits = mid
        else:
            hi_fails = mid
    return lo_fits


def allocator_suggestions(plan: Plan, est: MemoryEstimate, answer: "AllocatorAnswer", gpu: "GPUSpec") -> list[Any]:
    """The allocator settings under which the step fits the card, as suggestions (device: the smallest
    card the step runs in with them, the least allocator memory plus the CUDA context: with the
    allocator's free-and-retry a setting can fit a card its reserved on a large card would not)."""
    from planner.suggest import Suggestion

    return [Suggestion(change=f"--alloc-conf {s.alloc_conf}", peak_allocated_bytes=est.peak_allocated_bytes,
                       device_bytes=s.min_capacity_bytes + gpu.cuda_context_bytes, fits=True, plan=plan, rank=0,
                       simulated=True) for s in answer.suggestions]


def judged_suggestions(plan: Plan, model: Any, gpu: "GPUSpec", config: AllocatorConfig, suggestions: list[Any]) -> list[Any]:
    """Suggestions found with the scaled estimate, their finalists of the plan's trace shape simulated:
    a shorter length (or smaller batch) that the simulation says does not fit is lowered to the largest
    that does."""
    from planner.engine import estimate
    from planner.suggest import Suggestion

    out = []
    for s in suggestions:
        if not same_shape(plan, s.plan):
            out.append(s)
            continue
        v = verdict(s.plan, model, gpu, config)
        if v is None:
            out.append(s)
            continue
        reserved, ok = v
        new = s.plan
        if not ok:
            field = next((f for f in NUMBERS if getattr(s.plan, f) != getattr(plan, f)), None)
            if field is not None:
                failed = getattr(s.plan, field)
                probe, rescaled = _search_fns(s.plan, model, gpu, config, field, untraced_fits=False)
                best = _largest_fitting(field, 0, rescaled(failed, None, 0, failed), probe, rescaled, fails=failed)
                if best > 0:
                    new = s.plan.model_copy(update={field: best})
                    reserved, ok = verdict(new, model, gpu, config) or (reserved, ok)
                    change = s.change.replace(f" {getattr(s.plan, field)}", f" {best}", 1)
                    # the lowered plan's own peak (the suggestion's was the value the simulation did not fit)
                    s = s.model_copy(update={"change": change,
                                             "peak_allocated_bytes": estimate(new, model, gpu).peak_allocated_bytes})
        out.append(Suggestion(change=s.change, peak_allocated_bytes=s.peak_allocated_bytes,
                              device_bytes=reserved + gpu.cuda_context_bytes, fits=ok, plan=new, layout=s.layout,
                              rank=s.rank, simulated=True))
    return sorted(out, key=lambda x: (not x.fits, x.rank))


def judged_limits(plan: Plan, model: Any, gpu: "GPUSpec", config: AllocatorConfig, reach: Any) -> Any:
    """Limits found with the scaled estimate, each checked with the simulation: the largest value the
    simulation fits, searched from the scaled estimate's candidate (`_simulated_largest`)."""
    if reach is None:
        return reach

    def checked(field: str, value: int) -> int:
        if field in reach.at_least or field not in NUMBERS or value < getattr(plan, field):
            return value

        # untraced values keep the scaled estimate's word (the limit was found with it)
        probe, rescaled = _search_fns(plan, model, gpu, config, field, untraced_fits=True)
        own = getattr(plan, field)  # it fits: a length whose grid values above it do not is its own
        return max(_largest_fitting(field, own, value, probe, rescaled), own)

    update: dict[str, Any] = {}
    if reach.max_batch is not None:
        update["max_batch"] = checked("batch", reach.max_batch)
    update["max_lengths"] = {f: checked(f, v) for f, v in reach.max_lengths.items()}
    return reach.model_copy(update=update)


def _search_fns(plan: Plan, model: Any, gpu: "GPUSpec", config: AllocatorConfig, field: str,
                untraced_fits: bool) -> tuple[Any, Any]:
    """`_simulated_largest`'s probe and rescaled candidate for the plan's `field`: probe(v) -> (fits,
    the reserved it held where it fits) by one replay under the card (`untraced_fits` where the engine
    does not trace v); rescaled(at, reserved, lo, hi) -> `_rescaled_candidate`."""

    def probe(value: int) -> "tuple[bool, int | None]":
        r = verdict(plan.model_copy(update={field: value}), model, gpu, config, fits_only=True)
        return (untraced_fits, None) if r is None else (r[1], r[0] if r[1] else None)

    def rescaled(at: int, reserved: "int | None", lo: int, hi: "int | None") -> int:
        return _rescaled_candidate(plan, model, gpu, config, field, at, reserved, lo, hi)

    return probe, rescaled


def _largest_fitting(field: str, fits: int, candidate: int, probe: Any, rescaled: Any,
                     fails: "int | None" = None) -> int:
    """`_simulated_largest` over the values a `field` is stated at: a batch any integer, a length a
    value of the length grid (the search then runs over grid indices: `_on_grid`)."""
    if field == "batch":
        return _simulated_largest(fits, candidate, probe, rescaled, fails=fails)
    probe, rescaled = _on_grid(probe, rescaled)
    found = _simulated_largest(length_grid.index_of(fits), length_grid.index_of(candidate), probe, rescaled,
                               fails=None if fails is None else length_grid.ceil_index(fails))
    return length_grid.value_of(found)


def _on_grid(probe: Any, rescaled: Any) -> tuple[Any, Any]:
    """`_search_fns`' probe and rescaled candidate over length-grid indices (planner.length_grid)
    rather than values: the search then finds the largest index that fits."""

    def probe_i(i: int) -> "tuple[bool, int | None]":
        v = length_grid.value_of(i)
        return (False, None) if v > MAX_COUNT else probe(v)

    def rescaled_i(at: int, reserved: "int | None", lo: int, hi: "int | None") -> int:
        v = rescaled(length_grid.value_of(at), reserved, length_grid.value_of(lo),
                     None if hi is None else length_grid.value_of(hi))
        return length_grid.index_of(v)

    return probe_i, rescaled_i


def _simulated_largest(fits: int, candidate: int, probe: Any, rescaled: Any, tries: int = 6,
                       fails: "int | None" = None) -> int:
    """The largest value the simulation fits, above `fits` (which does). A replay costs tens of ms, so
    the search starts at the scaled estimate's candidate and moves by the estimate rescaled with the
    simulation (`probe(v)` -> (fits, reserved where it fits); `rescaled(v, reserved, lo, hi)`: from the
    last fitting value, or from an unlimited replay at a failing one while none fitted): up from a fit
    (the next value where the rescaled candidate stays), down from a failure by at most 1, 2, 4... (the
    rescaled candidate is often just past the limit). After `tries` a gallop up (while nothing
    failed) and a bisection between the last fitting and first failing values finish it. `fails`: a
    value known to fail, if any."""
    lo, hi = fits, fails
    lo_reserved = None  # the simulation's reserved at lo, once probed
    fails = 0
    guess = candidate
    for _ in range(tries):
        if guess <= lo or (hi is not None and guess >= hi):
            break
        ok, reserved = probe(guess)
        if ok:
            lo, lo_reserved = guess, reserved
        else:
            hi, fails = guess, fails + 1
        if hi is not None and hi - lo <= 1:
            return lo
        if ok:
            nxt = rescaled(lo, lo_reserved, lo, hi)
            guess = nxt if nxt > lo else lo + 1
        else:
            nxt = rescaled(lo, lo_reserved, lo, hi) if lo_reserved is not None else rescaled(hi, None, lo, hi)
            guess = max(min(nxt, hi - (1 << (fails - 1))), lo + 1)
    if hi is None:
        step = 1
        while lo + step <= MAX_COUNT and probe(lo + step)[0]:
            lo, step = lo + step, step * 2
        hi = lo + step
    return _largest(lo, hi, lambda v: probe(v)[0])


def _rescaled_candidate(plan: Plan, model: Any, gpu: "GPUSpec", config: AllocatorConfig, field: str, at: int,
                        reserved: "int | None", lo: int, hi: "int | None") -> int:
    """The largest value in (lo, hi) whose estimated reserved, scaled by the simulated-to-estimated
    ratio at `at`, fits the allocator's share of the card (microsecond estimates; `reserved`: the
    simulation's at `at` where known, else one replay on an unlimited card); the midpoint (or `at`)
    where `at` is not traced."""
    from planner.engine import estimate
    from planner.engine.allocator import replay
    from planner.engine.simulation import FIT_MAX_EVENTS, TraceUnsupported, allocator_capacity, plan_trace

    def est_reserved(v: int) -> int:
        return estimate(plan.model_copy(update={field: v}), model, gpu).reserved_bytes

    if reserved is None:
        try:
            trace = plan_trace(plan.model_copy(update={field: at}), model, gpu, coded=True, max_events=FIT_MAX_EVENTS)
        except (TraceUnsupported, ValueError):
            return at if hi is None else (lo + hi) // 2
        reserved = replay(trace, config).peak_reserved_bytes
    ratio = reserved / max(est_reserved(at), 1)
    capacity = allocator_capacity(gpu)

    def fits(v: int) -> bool:
        return est_reserved(v) * ratio <= capacity

    if hi is None:  # nothing failed yet: double past the estimate's last fitting value
        hi = at + 1
        while hi <= MAX_COUNT and fits(hi):
            lo, hi = hi, hi + (hi - lo) * 2
        hi = min(hi, MAX_COUNT + 1)
    return _largest(lo, hi, fits)
