"""Time one estimate (memory, and memory + the op-level step time) through the Python API, warm,
against llm-analysis and against the roofline time it replaced, measured in the same run.

    python benchmarks/estimate_speed.py [--repeats 9] [--min-time 0.05] [--json]

Each row times `estimate(plan, spec)` (or the peer's call) in a loop: one repeat runs the call
enough times to last at least --min-time seconds (calibrated once, like timeit's autorange) and
records the mean per call; the row's figure is the median over --repeats repeats. The garbage
collector is off while timing (as in timeit). Target: our median <= 0.1 ms per estimate.

Rows:
  full / qlora / generate   one fixed plan each, so the engine's cached timeline is hit every call.
  varying                   full bf16 with batch and seq changing every call; the Plan objects are
                            built beforehand, so only the estimate is timed.
  varying + Plan(...)       the same, but each call also builds its Plan (pydantic validation).
  Plan(...) alone           just building those Plans, for scale.

The peer is llm-analysis (PyPI `llm-analysis` 0.2.2): `LLMAnalysis(...).training(...)` for a
Llama-3.1-8B-shaped ModelConfig on its `a100-sxm-80gb`, pure bf16 AdamW (bf16 weights, grads and
moments: master_weights_dtype_bytes=2, other_op_bytes=2), no recomputation, flash attention.
It is imported with `transformers` blocked (its only use is AutoConfig lookups by hub name, which
this script does not need; importing it would pull in torch). Its `training()` also computes FLOPs
and latency and formats its log messages, which is part of what one call of it costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from planner.engine import estimate
from planner.models import load_model
from planner.specs import Plan

MODEL = "llama-3.1-8b"
TARGET_MS = 0.1
# batch x seq pairs for the varying rows; all fit an 8B bf16 step on 80 GB in both tools.
VARYING = [(b, s) for b in (1, 2) for s in (256, 512, 1024, 1536, 2048)]


def _per_call_ns(fn: Callable[[int], Any], n: int) -> float:
    t0 = time.perf_counter_ns()
    for i in range(n):
        fn(i)
    return (time.perf_counter_ns() - t0) / n


def bench(calls: dict[str, Callable[[int], Any]], repeats: int, min_time: float) -> dict[str, dict[str, float]]:
    """Per row: median/min/max over repeats of the mean per-call time (ns); fn(i) is one call.

    Repeats are interleaved across rows (row A, row B, ..., then again), so a slow patch of a shared
    machine hits every row alike and the ratios stay fair.
    """
    iters: dict[str, int] = {}
    for name, fn in calls.items():
        for i in range(3):  # warm-up: caches, first-call imports
            fn(i)
        n = 1
        while _per_call_ns(fn, n) * n < min_time * 1e9:  # calibrate iterations per repeat
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


def with_time(plan: Plan, spec: Any, gpu: Any, profile: Any) -> Any:
    """What `fit` computes per plan: the memory estimate and the op-level step time."""
    from planner.engine.timing import step_time
    from planner.plugins import technique

    return estimate(plan, spec, gpu), step_time(technique(plan.task).workload(plan, spec), profile)


def roofline_time(plan: Plan, spec: Any, gpu: Any) -> Any:
    """The time model this one replaced, for the same-run ratio: one roofline over the micro-batch
    (planner.engine.compute.micro_batch_time) plus the optimizer's memory-bound step."""
    from planner.engine import compute
    from planner.engine.resident import resident

    t = compute.micro_batch_time(spec, plan.batch * plan.seq, plan.seq, gpu, dtype=plan.compute_dtype,
                                 method=plan.method, grad_ckpt=plan.grad_ckpt)
    res = resident(spec, plan)
    return estimate(plan, spec, gpu), t.total + compute.optimizer_step_time(res.trainable_elems, 14, gpu)


def our_calls() -> dict[str, Callable[[int], Any]]:
    from planner.engine.devices import profile_for
    from planner.gpus import load_gpu

    gpu = load_gpu("h200")
    profile = profile_for(gpu)
    spec = load_model(MODEL)
    full = Plan(model=MODEL, method="full", precision="bf16", batch=1, seq=2048)
    qlora = Plan(model=MODEL, method="qlora", grad_ckpt=True, batch=4, seq=2048)
    gen = Plan(model=MODEL, task="generate", batch=16)
    varying = [Plan(model=MODEL, batch=b, seq=s) for b, s in VARYING]
    k = len(varying)
    return {
        "full bf16 b1 s2048": lambda i: estimate(full, spec),
        "qlora ckpt b4 s2048": lambda i: estimate(qlora, spec),
        "generate b16": lambda i: estimate(gen, spec),
        "varying batch/seq": lambda i: estimate(varying[i % k], spec),
        "varying + Plan(...)": lambda i: estimate(Plan(model=MODEL, batch=VARYING[i % k][0], seq=VARYING[i % k][1]), spec),
        "Plan(...) alone": lambda i: Plan(model=MODEL, batch=VARYING[i % k][0], seq=VARYING[i % k][1]),
        # memory + the op-level time (what `fit` prices per plan), and the roofline time it replaced
        "full + op time": lambda i: with_time(full, spec, gpu, profile),
        "qlora + op time": lambda i: with_time(qlora, spec, gpu, profile),
        "generate + op time": lambda i: with_time(gen, spec, gpu, profile),
        "varying + op time": lambda i: with_time(varying[i % k], spec, gpu, profile),
        "full + roofline (before)": lambda i: roofline_time(full, spec, gpu),
    }


def peer_calls() -> tuple[dict[str, Callable[[int], Any]], str]:
    """llm-analysis calls keyed like ours, and its version; raises if it cannot run."""
    from importlib.metadata import version

    blocked = "transformers" not in sys.modules
    if blocked:
        sys.modules["transformers"] = None  # type: ignore[assignment]
    try:
        from llm_analysis.logger import logger

        logger.setLevel(logging.ERROR)  # before config.py warns that transformers is missing
        from llm_analysis.analysis import LLMAnalysis
        from llm_analysis.config import ModelConfig, ParallelismConfig, get_dtype_config_by_name, get_gpu_config_by_name
    finally:
        if blocked:
            del sys.modules["transformers"]
    mc = ModelConfig(name=MODEL, num_layers=32, n_head=32, hidden_dim=4096, vocab_size=128256, max_seq_len=131072,
                     num_key_value_heads=8, ffn_embed_dim=14336, expansion_ratio=3.5, model_type="llama")
    la = LLMAnalysis(mc, get_gpu_config_by_name("a100-sxm-80gb"), get_dtype_config_by_name("w16a16e16"), ParallelismConfig())
    common: dict[str, Any] = dict(gradient_accumulation_steps=1, flash_attn=True, mlp_gated_linear_units=True,
                                  master_weights_dtype_bytes=2, other_op_bytes=2)
    k = len(VARYING)

    def varying(i: int) -> dict:
        b, s = VARYING[i % k]
        return la.training(batch_size_per_gpu=b, seq_len=s, **common)

    return {
        "full bf16 b1 s2048": lambda i: la.training(batch_size_per_gpu=1, seq_len=2048, **common),
        "varying batch/seq": varying,
    }, version("llm-analysis")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="repeats per row (median over them; default 9, at least 7 advised)")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per repeat, at least (default 0.05)")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-analysis")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)

    ours_fns = our_calls()
    full_gib = ours_fns["full bf16 b1 s2048"](0).peak_allocated_bytes / 2**30
    calls = {("ours", name): fn for name, fn in ours_fns.items()}
    peer_note = "skipped (--no-peer)"
    if not args.no_peer:
        try:
            peer_fns, ver = peer_calls()
            for name, fn in peer_fns.items():
                fn(0)  # fails here, not mid-timing, if it cannot run
            peer_gib = peer_fns["full bf16 b1 s2048"](0)["(weight+op_state+grad+act)_memory_per_gpu"] / 2**30
            calls.update({("peer", name): fn for name, fn in peer_fns.items()})
            peer_note = (f"llm-analysis {ver}: LLMAnalysis.training(), a100-sxm-80gb, pure bf16 AdamW "
                         f"(full b1 s2048: it says {peer_gib:.1f} GiB, we say {full_gib:.1f} GiB peak allocated)")
        except Exception as e:  # noqa: BLE001 - any failure of the peer is reported, ours still timed
            peer_note = f"llm-analysis could not run: {type(e).__name__}: {e}"
    res = bench({f"{who}:{name}": fn for (who, name), fn in calls.items()}, args.repeats, args.min_time)
    ours = {key[5:]: r for key, r in res.items() if key.startswith("ours:")}
    peer = {key[5:]: r for key, r in res.items() if key.startswith("peer:")}

    rows = []
    for name, r in ours.items():
        row: dict[str, Any] = {"case": name, "ours_us": r["median_ns"] / 1e3, "ours_min_us": r["min_ns"] / 1e3,
                               "ours_iterations": r["iterations"]}
        if name in peer:
            row["peer_us"] = peer[name]["median_ns"] / 1e3
            row["peer_over_ours"] = peer[name]["median_ns"] / r["median_ns"]
        rows.append(row)
    timed = [r["ours_us"] for r in rows if "Plan(...)" not in r["case"]]
    ok = max(timed) <= TARGET_MS * 1e3
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.json:
        print(json.dumps({"rows": rows, "repeats": args.repeats, "target_ms": TARGET_MS, "meets_target": ok,
                          "cpus": os.cpu_count(), "load_avg_1min": load,
                          "peer": peer_note, "python": sys.version.split()[0]}, indent=2))
        return 0
    print(f"estimate() speed, {MODEL}, median of {args.repeats} repeats (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load avg {load:.2f})")
    print(f"peer: {peer_note}")
    print(f"{'case':<22} {'ours µs':>9} {'(min)':>8} {'peer µs':>10} {'peer/ours':>10}")
    for r in rows:
        p = f"{r['peer_us']:10.1f} {r['peer_over_ours']:9.1f}x" if "peer_us" in r else f"{'-':>10} {'-':>10}"
        print(f"{r['case']:<22} {r['ours_us']:9.1f} {r['ours_min_us']:8.1f} {p}")
    print(f"target: <= {TARGET_MS * 1e3:.0f} µs per estimate, time included (rows without Plan construction): "
          f"{'met' if ok else 'NOT met'}")
    by = {r["case"]: r["ours_us"] for r in rows}
    if "full + op time" in by and "full + roofline (before)" in by:
        print(f"op-level time vs the roofline it replaced (full b1 s2048, memory included): "
              f"{by['full + op time'] / by['full + roofline (before)']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
