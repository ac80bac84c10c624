"""Cold-start wall time of `planner fit ... --json` as a fresh process, against a bare interpreter.

    python benchmarks/cli_cold_start.py [--repeats 9] [--top 10] [--json]

Each repeat starts a new process (cold interpreter; the OS file cache is warm after the first).
The `planner` console script next to this interpreter is used when there is one, otherwise
`python -c "from planner.cli import main; ..."`. The baseline `python -c pass` is timed in the same
run, interleaved with the fit runs, so the difference is what planner itself costs at start-up.
Target: median <= 0.5 s for the fit command.

Also printed: the top imports by cumulative time (`python -X importtime`) for `import planner.cli`
and for the whole fit command, and a check that neither torch nor pandas (nor transformers) gets
imported on the fit path; the script exits 1 if one does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FIT_ARGS = ["fit", "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--method", "qlora",
            "--batch", "4", "--seq", "2048", "--grad-ckpt", "--json"]  # fmt: skip
TARGET_S = 0.5
HEAVY = ("torch", "pandas", "transformers", "numpy")
FORBIDDEN = ("torch", "pandas")
RUN_FIT = f"import sys; from planner.cli import main; sys.exit(main({FIT_ARGS!r}))"


def fit_command() -> list[str]:
    script = Path(sys.executable).parent / "planner"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *FIT_ARGS]
    found = shutil.which("planner")
    return [found, *FIT_ARGS] if found else [sys.executable, "-c", RUN_FIT]


def wall_s(cmd: list[str]) -> float:
    t0 = time.perf_counter_ns()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t = (time.perf_counter_ns() - t0) / 1e9
    if done.returncode not in (0, 1):  # 1 = does not fit, still a full run
        raise RuntimeError(f"{cmd!r} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return t


def importtime(code: str, top: int) -> list[dict[str, Any]]:
    """Top modules by cumulative import time (µs) for `python -X importtime -c code`."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = (p.strip() for p in line[len("import time:"):].split("|"))
        rows.append({"module": name.strip(), "self_us": int(self_us), "cumulative_us": int(cum_us)})
    return sorted(rows, key=lambda r: -r["cumulative_us"])[:top]


def heavy_modules_on_fit_path() -> dict[str, bool]:
    code = ("import io, json, sys; from planner.cli import main; "
            f"main({FIT_ARGS!r}, stdout=io.StringIO()); "
            f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9, help="fresh processes per command (median over them; default 9, at least 7)")
    ap.add_argument("--top", type=int, default=10, help="importtime rows to show (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = ap.parse_args(argv)

    fit, base = fit_command(), [sys.executable, "-c", "pass"]
    wall_s(fit), wall_s(base)  # warm the OS file cache and .pyc files
    fit_t: list[float] = []
    base_t: list[float] = []
    for _ in range(args.repeats):
        fit_t.append(wall_s(fit))
        base_t.append(wall_s(base))
    fit_med, base_med = statistics.median(fit_t), statistics.median(base_t)
    heavy = heavy_modules_on_fit_path()
    leaked = [m for m in FORBIDDEN if heavy[m]]
    report = {
        "command": " ".join(["planner", *FIT_ARGS]) if fit[0] != sys.executable else " ".join(fit),
        "repeats": args.repeats, "cpus": os.cpu_count(),
        "fit_median_s": fit_med, "fit_min_s": min(fit_t), "fit_max_s": max(fit_t),
        "python_pass_median_s": base_med, "difference_s": fit_med - base_med, "ratio": fit_med / base_med,
        "target_s": TARGET_S, "meets_target": fit_med <= TARGET_S,
        "heavy_modules_loaded": heavy, "forbidden_loaded": leaked,
        "importtime_planner_cli": importtime("import planner.cli", args.top),
        "importtime_fit": importtime(RUN_FIT, args.top),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if leaked else 0
    print(f"cold start, median of {args.repeats} fresh processes ({os.cpu_count()} CPUs, python {sys.version.split()[0]})")
    print(f"  {report['command']}")
    print(f"  fit            {fit_med * 1e3:7.1f} ms  (min {min(fit_t) * 1e3:.1f}, max {max(fit_t) * 1e3:.1f})")
    print(f"  python -c pass {base_med * 1e3:7.1f} ms  (min {min(base_t) * 1e3:.1f})")
    print(f"  planner's own  {(fit_med - base_med) * 1e3:7.1f} ms  (fit / bare = {fit_med / base_med:.2f}x)")
    print(f"  target <= {TARGET_S * 1e3:.0f} ms: {'met' if fit_med <= TARGET_S else 'NOT met'}")
    print("modules loaded by the fit path: " + ", ".join(f"{m}={'yes' if v else 'no'}" for m, v in heavy.items()))
    print(f"  torch/pandas on the fit path: {'LOADED: ' + ', '.join(leaked) if leaked else 'none (ok)'}")
    for title, key in (("import planner.cli", "importtime_planner_cli"), ("the fit command", "importtime_fit")):
        print(f"top {args.top} imports by cumulative time, {title} (python -X importtime, one run):")
        print(f"  {'cumulative ms':>13} {'self ms':>8}  module")
        for r in report[key]:
            print(f"  {r['cumulative_us'] / 1e3:13.1f} {r['self_us'] / 1e3:8.1f}  {r['module']}")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
