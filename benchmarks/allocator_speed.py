"""Speed of the caching-allocator simulation (planner/engine/allocator.py) on real step traces.

    python benchmarks/allocator_speed.py [--repeats 5] [--plans NAME,...]

Each plan's allocation trace is recorded once by a dry run at full scale (fake tensors; needs
torch, 10-90 s per plan, cached under the system temp folder), then replayed: the median over
`--repeats` of one replay on an unlimited card (reserved), and of the whole answer (reserved, the
verdict on the card, the smallest card memory by bisection). No peer is measured: the Python
simulators published (DynaPipe's allocation_simulator) are not packaged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLANS = {
    "llama-3.1-8b-lora": dict(model="llama-3.1-8b", method="lora", batch=1, seq=2048, gpu="h100-sxm"),
    "llama-3.1-8b-qlora-ckpt": dict(model="llama-3.1-8b", method="qlora", batch=4, seq=2048, grad_ckpt=True,
                                    gpu="a100-40gb"),
    "llama-3.2-1b-full-ckpt": dict(model="llama-3.2-1b", batch=4, seq=2048, grad_ckpt=True, gpu="h200"),
}


def trace_for(name: str, kw: dict) -> list[tuple]:
    import torch

    from planner.backends import allocation
    from planner.backends.dryrun._run import dry_run_impl
    from planner.models import model_config
    from planner.specs import Plan

    cache = Path(tempfile.gettempdir()) / f"planner-trace-{name}-torch{torch.__version__}.json"
    if cache.exists():
        return [tuple(e) for e in json.loads(cache.read_text())]
    plan = Plan(**kw)
    print(f"  recording {name} (a dry run at full scale)...", flush=True)
    r = dry_run_impl(plan, model_config(plan.model), steps=3, device="fake", trace=allocation.trace_options(plan))
    cache.write_text(json.dumps(r.allocation_trace))
    return r.allocation_trace


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plans", default=",".join(PLANS))
    args = ap.parse_args(argv)
    from planner.backends import allocation
    from planner.engine.allocator import replay
    from planner.specs import Plan

    print(f"{'plan':<26} {'events':>8} {'replay ms':>10} {'events/s':>10} {'answer ms':>10}")
    for name in args.plans.split(","):
        kw = PLANS[name]
        trace = trace_for(name, kw)
        plan = Plan(**kw)
        one = median_s(lambda: replay(trace), args.repeats)
        full = median_s(lambda: allocation.answer(trace, plan), args.repeats)
        print(f"{name:<26} {len(trace):>8} {one * 1e3:>10.1f} {len(trace) / one:>10.0f} {full * 1e3:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
