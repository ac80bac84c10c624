"""Speed of `planner plan`'s search (planner.search): candidate plans per second, counted honestly.

    python benchmarks/plan_speed.py [--repeats 3] [--cases NAME,...] [--json]

For each case: the space's size (every valid layout x knob x micro-batch), how many candidates the
engine priced and how many the search skipped because a priced one dominates them, and the wall
time (median over --repeats, the per-shape caches cleared before each: a cold search, as the CLI
runs it). Rate = space / seconds (every candidate of the space is answered: priced or dominated).
Target (issue 15): 1,000,000 candidates in <= 10 s.
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

CASES = {
    "8b-8gpus": dict(plan=dict(model="llama-3.1-8b", gpu="h100-sxm", seq=2048), global_batch=64, max_gpus=8),
    "8b-64gpus-full": dict(plan=dict(model="llama-3.1-8b", gpu="h100-sxm", seq=4096, method="full"),
                           global_batch=512, max_gpus=64, pinned={"method"}),
    "70b-64gpus": dict(plan=dict(model="llama-3.1-70b", gpu="h100-sxm", seq=4096), global_batch=512, max_gpus=64),
}


def _clear() -> None:
    import importlib

    for name in ("planner.engine.simulation", "planner.engine.estimate"):
        importlib.import_module(name)._cache.clear()
    importlib.import_module("planner.engine.timing")._MICRO_BATCH_CACHE.clear()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="8b-8gpus,8b-64gpus-full")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from planner.search import search
    from planner.specs import Plan

    rows = []
    for name in args.cases.split(","):
        case = CASES[name]
        times, result = [], None
        for _ in range(args.repeats):
            _clear()
            t0 = time.perf_counter()
            result = search(Plan(**case["plan"]), global_batch=case["global_batch"], max_gpus=case["max_gpus"],
                            pinned=case.get("pinned", set()), top=10)
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        rows.append({"case": name, "space": result.space, "priced": result.estimated, "dominated": result.pruned,
                     "fitting": result.fitting, "seconds": s, "candidates_per_s": result.space / s,
                     "best_tokens_per_s": result.best[0].tokens_per_s if result.best else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'case':<16} {'space':>9} {'priced':>8} {'dominated':>10} {'fitting':>8} {'seconds':>8} {'cand/s':>9}")
    for r in rows:
        print(f"{r['case']:<16} {r['space']:>9,} {r['priced']:>8,} {r['dominated']:>10,} {r['fitting']:>8,} "
              f"{r['seconds']:>8.2f} {r['candidates_per_s']:>9,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
