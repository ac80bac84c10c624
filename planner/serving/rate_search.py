"""The highest request rate a serving setup sustains under latency goals (`planner plan --serve`).

Poisson arrivals at rate r (the same seed: the same draws, scaled by 1/r), simulated by
planner.serving.service.serve; a rate meets the goals when the simulation's p99 time to first token
and p99 time per output token are within them. Latency grows with the rate (more queueing, larger
batches), so the search doubles the rate from `start` until a rate misses, then bisects in log space
to a relative tolerance. The answer is a rate that was simulated and met the goals, with its report,
and the first rate above it that missed, with what it missed.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

MAX_RATE = 1e5


class RatePoint(BaseModel):
    rate: float
    ttft_p99_s: float
    tpot_p99_s: float
    requests_per_s: float
    tokens_per_s: float
    meets: bool


class RateAnswer(BaseModel):
    fits: bool  # the setup fits the card at all (vLLM would start)
    reason: str = ""
    ttft_p99_goal_s: float | None
    tpot_p99_goal_s: float | None
    best: RatePoint | None  # the highest rate found that meets the goals
    missed: RatePoint | None  # the lowest rate found above it that does not
    probes: list[RatePoint]
    tolerance: float


def max_rate(spec: Any, traffic: Any, ttft_p99: float | None, tpot_p99: float | None, *, start: float = 1.0,
             tolerance: float = 0.02) -> RateAnswer:
    """The highest Poisson rate (requests/s) `spec` serves `traffic`'s requests at within the goals."""
    from planner.serving.service import serve

    if ttft_p99 is None and tpot_p99 is None:
        raise ValueError("serve: give a latency goal: --ttft-p99 SECONDS and/or --tpot-p99 SECONDS")
    for name, v in (("ttft_p99", ttft_p99), ("tpot_p99", tpot_p99)):
        if v is not None and not v > 0:
            raise ValueError(f"{name}: must be > 0 seconds (got {v})")
    probes: list[RatePoint] = []

    def probe(rate: float) -> RatePoint | None:
        r = serve(spec, traffic.model_copy(update={"rate": rate}))
        if not r.fits:
            return None
        s = r.simulations[0]
        ok = (ttft_p99 is None or s.ttft_s.p99 <= ttft_p99) and (tpot_p99 is None or s.tpot_s.p99 <= tpot_p99)
        pt = RatePoint(rate=rate, ttft_p99_s=s.ttft_s.p99, tpot_p99_s=s.tpot_s.p99, requests_per_s=s.requests_per_s,
                       tokens_per_s=s.tokens_per_s, meets=ok)
        probes.append(pt)
        return pt

    first = probe(start)
    if first is None:
        r = serve(spec, traffic.model_copy(update={"rate": start}), simulate_traffic=False)
        return RateAnswer(fits=False, reason=r.capacity.reason, ttft_p99_goal_s=ttft_p99, tpot_p99_goal_s=tpot_p99,
                          best=None, missed=None, probes=[], tolerance=tolerance)
    lo: RatePoint | None = first if first.meets else None
    hi: RatePoint | None = None if first.meets else first
    if lo is not None:  # double until a rate misses
        while hi is None and lo.rate * 2 <= MAX_RATE:
            pt = probe(lo.rate * 2)
            assert pt is not None
            lo, hi = (pt, None) if pt.meets else (lo, pt)
    else:  # halve until a rate meets (or the rate is negligible)
        while lo is None and hi.rate / 2 >= 1e-4:
            pt = probe(hi.rate / 2)
            assert pt is not None
            lo, hi = (pt, hi) if pt.meets else (None, pt)
    while lo is not None and hi is not None and hi.rate / lo.rate > 1 + tolerance:
        pt = probe(math.sqrt(lo.rate * hi.rate))
        assert pt is not None
        lo, hi = (pt, hi) if pt.meets else (lo, pt)
    return RateAnswer(fits=True, ttft_p99_goal_s=ttft_p99, tpot_p99_goal_s=tpot_p99, best=lo, missed=hi, probes=probes,
                      tolerance=tolerance)
