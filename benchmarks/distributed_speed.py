"""Time one distributed estimate (`planner.engine.distributed.estimate_distributed`) through the Python API, warm.

    python benchmarks/distributed_speed.py [--repeats 9] [--min-time 0.05] [--json]

Each row calls `estimate_distributed(plan, layout, spec, gpu)` in a loop: one repeat runs it enough
times to last at least --min-time seconds (calibrated once, like timeit's autorange) and records the
mean per call; the row's figure is the median over --repeats repeats, the rows interleaved so a slow
patch of a shared machine hits them alike. The garbage collector is off while timing. Plans and
layouts are built beforehand; the "cold" row clears the module's caches before every call (the
replay of one decoder layer by the engine is what they hold): what a one-shot CLI call pays.
Target: median <= 2 ms per estimate, every row (warm and cold). On a loaded machine the figures
scale with the load; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from planner.architecture import spec_from_config
from planner.gpus import load_gpu
from planner.models import load_model
from planner.engine.distributed import Layout, estimate_distributed, layout_for_plan
from planner.specs import Plan

TARGET_MS = 2.0


def _per_call_ns(fn: Callable[[int], Any], n: int) -> float:
    t0 = time.perf_counter_ns()
    for i in range(n):
        fn(i)
    return (time.perf_counter_ns() - t0) / n


def cases() -> dict[str, Callable[[int], Any]]:
    h100, a100 = load_gpu("h100-sxm"), load_gpu("a100-80gb")
    l70, l8 = load_model("llama-3.1-70b"), load_model("llama-3.1-8b")
    ex = Plan(model=l70.id, batch=2, seq=4096, grad_ckpt=True)
    ex_lay = layout_for_plan(2, 1, gpus=16, gpus_per_node=8, zero=3, tp=2, pp=1)
    pp = Plan(model=l70.id, batch=1, seq=4096, grad_ckpt=True)
    pp_lay = layout_for_plan(1, 16, gpus=64, gpus_per_node=8, zero=1, tp=8, sp=True, pp=4,
                             pp_schedule="interleaved", pp_chunks=2)
    off = Plan(model=l8.id, batch=4, seq=2048)
    off_lay = layout_for_plan(4, 1, gpus=16, gpus_per_node=8, zero=3, offload="optimizer+params")
    qlora = Plan(model=l8.id, method="qlora", batch=4, seq=2048, grad_ckpt=True)
    q_lay = layout_for_plan(4, 2, gpus=8, fsdp="full-shard")
    gpt1t = spec_from_config({"model_type": "gpt2", "n_embd": 25600, "n_layer": 128, "n_head": 160,
                              "vocab_size": 51200, "n_positions": 2048}, id="gpt-1t")
    meg = Plan(model=gpt1t.id, precision="mixed-fp16", batch=1, seq=2048, grad_ckpt=True, attn="eager")
    meg_lay = Layout(gpus=3072, gpus_per_node=8, tp=8, pp=64, micro_batch=1, global_batch=3072, inter_node_gbps=200)
    batches = [layout_for_plan(b, 1, gpus=16, gpus_per_node=8, zero=3, tp=2) for b in (1, 2, 4, 8)]
    plans = [Plan(model=l70.id, batch=b, seq=s, grad_ckpt=True) for b, s in zip((1, 2, 4, 8), (8192, 4096, 2048, 1024))]

    def cold(i: int) -> Any:
        from planner.engine.distributed import ranks as est_mod, shard

        est_mod._layer_cache.clear()
        shard._cache.clear()
        return estimate_distributed(ex, ex_lay, l70, h100)

    return {
        "issue example 70b z3 tp2 x16": lambda i: estimate_distributed(ex, ex_lay, l70, h100),
        "70b tp8 sp pp4 interleaved x64": lambda i: estimate_distributed(pp, pp_lay, l70, h100),
        "8b z3 offload params x16": lambda i: estimate_distributed(off, off_lay, l8, h100),
        "8b qlora fsdp x8": lambda i: estimate_distributed(qlora, q_lay, l8, h100),
        "megatron 1T x3072 (a100)": lambda i: estimate_distributed(meg, meg_lay, gpt1t, a100, activations="megatron",
                                                                   style="megatron"),
        "varying batch/seq": lambda i: estimate_distributed(plans[i % 4], batches[i % 4], l70, h100),
        "cold (caches cleared)": cold,
    }


def bench(calls: dict[str, Callable[[int], Any]], repeats: int, min_time: float) -> dict[str, dict[str, float]]:
    iters: dict[str, int] = {}
    for name, fn in calls.items():
        for i in range(3):
            fn(i)
        n = 1
        while _per_call_ns(fn, n) * n < min_time * 1e9:
            n *= 2
        iters[name] = n
    samples: dict[str, list[float]] = {name: [] for name in calls}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in calls.items():
                samples[name].append(_per_call_ns(fn, iters[name]))
    finally:
        if was_enabled:
            gc.enable()
    return {name: {"median_ns": statistics.median(v), "min_ns": min(v), "max_ns": max(v), "iterations": iters[name]}
            for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="repeats per row (median over them; default 9)")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per repeat, at least (default 0.05)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    res = bench(cases(), args.repeats, args.min_time)
    rows = [{"case": k, "median_ms": r["median_ns"] / 1e6, "min_ms": r["min_ns"] / 1e6, "iterations": r["iterations"]}
            for k, r in res.items()]
    ok = max(r["median_ms"] for r in rows) <= TARGET_MS
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.json:
        print(json.dumps({"rows": rows, "repeats": args.repeats, "target_ms": TARGET_MS, "meets_target": ok,
                          "cpus": os.cpu_count(), "load_avg_1min": load, "python": sys.version.split()[0]}, indent=2))
        return 0 if ok else 1
    print(f"estimate_distributed() speed, median of {args.repeats} repeats (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load avg {load:.2f})")
    print(f"{'case':<34} {'median ms':>10} {'(min)':>8}")
    for r in rows:
        print(f"{r['case']:<34} {r['median_ms']:10.3f} {r['min_ms']:8.3f}")
    print(f"target: <= {TARGET_MS:.0f} ms per estimate: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
