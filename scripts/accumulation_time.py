"""Gradient accumulation's step time on this CPU, measured against the engine's price.

    python scripts/accumulation_time.py PROFILE.json [--rounds 5]

Three tiny programs (llama 4 x 128 bf16 full and LoRA, b2 s128; llama 2 x 256 fp32, b2 s64) with
--grad-accum 1, 2 and 4, timed in interleaved rounds (planner.backends.step_programs.time_cases: a
sample is the median of 3 steps after a warm-up step; the figure the median of the samples), priced
by `PROFILE.json` (`planner calibrate --device cpu -o PROFILE.json`). Prints each step and, per
program, the time a micro-batch adds ((t(4) - t(1)) / 3) and the fixed part of the step (t(1) less
that), measured and predicted: the accumulation's structure is checked where the profile's absolute
error cancels."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

PROGRAMS = [  # (name, config args, plan fields)
    ("llama-4x128 bf16", dict(layers=4, hidden=128), dict(batch=2, seq=128)),
    ("llama-4x128 bf16 lora", dict(layers=4, hidden=128), dict(batch=2, seq=128, method="lora", lora_rank=8)),
    ("llama-2x256 fp32", dict(layers=2, hidden=256, dtype="float32"), dict(batch=2, seq=64, precision="fp32")),
]
ACCUM = (1, 2, 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    from planner.backends.step_programs import Case, llama_config, time_cases
    from planner.engine.timing import step_time
    from planner.profiles import load_profile
    from planner.specs import Plan

    prof = load_profile(args.profile)
    root = Path(tempfile.mkdtemp(prefix="planner-accumulation-"))
    cases: list[Case] = []
    for name, cfg, kw in PROGRAMS:
        path = root / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(llama_config(cfg["layers"], cfg["hidden"], dtype=cfg.get("dtype", "bfloat16"))))
        cases += [Case(f"{name} k={k}", Plan(model=str(path), grad_accum=k, **kw)) for k in ACCUM]
    time_cases(cases, args.rounds, threads=1)
    got = {c.label: (c.median, step_time(c.workload(), prof).total_s) for c in cases}
    print(f"{'program':28s} {'measured ms':>12s} {'predicted ms':>13s} {'spread':>7s}")
    for c in cases:
        m, p = got[c.label]
        print(f"{c.label:28s} {m * 1e3:12.1f} {p * 1e3:13.1f} {(max(c.samples) - min(c.samples)) / c.median:7.0%}")
    print(f"\n{'program':22s} {'a micro-batch ms (meas / pred)':>32s} {'the rest ms (meas / pred)':>27s}")
    for name, _, _ in PROGRAMS:
        (m1, p1), (m4, p4) = got[f"{name} k=1"], got[f"{name} k=4"]
        dm, dp = (m4 - m1) / 3, (p4 - p1) / 3
        print(f"{name:22s} {dm * 1e3:13.1f} / {dp * 1e3:6.1f} ({dp / dm - 1:+6.1%}) "
              f"{(m1 - dm) * 1e3:10.1f} / {(p1 - dp) * 1e3:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
