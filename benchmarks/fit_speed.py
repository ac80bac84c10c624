"""Speed of the whole `planner fit` answer with the simulated caching allocator (pure Python).

    python benchmarks/fit_speed.py [--repeats 7] [--plans NAME,...] [--json]

Each plan is answered by `planner.api.fit(plan)` as the CLI does (estimate, the engine's allocation
trace through the simulated allocator, the verdict, the smallest card, the searches), timed:
- cold: the first answer in the process for the plan's shape (the symbolic trace is built, then
  cached like the engine's timelines), median over `--repeats` fresh caches;
- warm: the trace cached, median over `--repeats` calls;
and the warm answer's parts, medians: the trace evaluated at the plan's numbers, one replay on an
unlimited card (reserved), the allocator's whole answer (reserved, verdict, smallest card by
bisection); and how many allocator runs one warm fit makes (`runs`: replays from the start, and the
smallest card's bisection runs that resume from a shared state, counted alike; `limit runs`: those
of the limits' and suggestions' searches). Target (issue 13): the whole warm fit <= 50 ms for an 8B
training plan.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLANS = {
    "8b-qlora-ckpt-b4": dict(model="llama-3.1-8b", gpu="a100-80gb", method="qlora", batch=4, seq=2048, grad_ckpt=True),
    "8b-lora-ckpt-b4": dict(model="llama-3.1-8b", gpu="a100-80gb", method="lora", batch=4, seq=2048, grad_ckpt=True),
    "8b-full-b1": dict(model="llama-3.1-8b", gpu="h200", batch=1, seq=2048),
}


def _clear() -> None:
    """Empty the per-shape caches (the symbolic traces and the engine's timelines)."""
    import importlib

    for name in ("planner.engine.simulation", "planner.engine.estimate"):
        importlib.import_module(name)._cache.clear()


def count_runs(fn) -> tuple[int, int]:
    """(allocator runs, those made by the limits' and suggestions' searches) in one call of fn."""
    from planner import simulated
    from planner.engine import allocator

    real_run = allocator._run_fast
    real = {name: getattr(simulated, name) for name in ("judged_limits", "judged_suggestions")}
    runs = [0, 0]
    searching = [False]

    def counted(*a, **k):
        runs[0] += 1
        runs[1] += searching[0]
        return real_run(*a, **k)

    def in_search(fn):
        def wrapped(*a, **k):
            searching[0] = True
            try:
                return fn(*a, **k)
            finally:
                searching[0] = False
        return wrapped

    allocator._run_fast = counted
    for name, f in real.items():
        setattr(simulated, name, in_search(f))
    try:
        fn()
    finally:
        allocator._run_fast = real_run
        for name, f in real.items():
            setattr(simulated, name, f)
    return runs[0], runs[1]


def median_ms(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from planner.api import fit
    from planner.engine.allocator import replay, simulate
    from planner.engine.simulation import allocator_capacity, plan_trace
    from planner.gpus import resolve_gpu
    from planner.models import load_model
    from planner.specs import Plan

    rows = []
    for name in args.plans.split(","):
        plan = Plan(**PLANS[name])
        model, gpu = load_model(plan.model), resolve_gpu(plan.gpu, None)
        cold = median_ms(lambda: fit(plan), max(1, args.repeats // 2), before=_clear)
        fit(plan)
        warm = median_ms(lambda: fit(plan), args.repeats)
        trace = plan_trace(plan, model, gpu, coded=True)
        evaluate = median_ms(lambda: plan_trace(plan, model, gpu, coded=True), args.repeats)
        one = median_ms(lambda: replay(trace), args.repeats)
        answer = median_ms(lambda: simulate(trace, None, allocator_capacity(gpu)), args.repeats)
        runs, searched = count_runs(lambda: fit(plan))
        rows.append({"plan": name, "events": len(trace), "cold_ms": cold, "warm_ms": warm, "evaluate_ms": evaluate,
                     "replay_ms": one, "answer_ms": answer, "runs": runs, "limit_runs": searched})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'plan':<20} {'events':>8} {'cold ms':>9} {'warm ms':>9} {'trace ms':>9} {'replay ms':>10} {'answer ms':>10} "
          f"{'runs':>5} {'limit runs':>10}")
    for r in rows:
        print(f"{r['plan']:<20} {r['events']:>8} {r['cold_ms']:>9.0f} {r['warm_ms']:>9.0f} {r['evaluate_ms']:>9.2f} "
              f"{r['replay_ms']:>10.1f} {r['answer_ms']:>10.1f} {r['runs']:>5} {r['limit_runs']:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
