"""`planner calibrate`: this machine's device profile from micro-benchmarks, or a profile's few free
parameters fitted to whole-step measurements (`--from-steps`).

Registered by planner/cli.py (HELP, add_arguments, run). Imports only the standard library at import
time; torch (through planner.backends.calibrate) only when a calibration runs.

Output: with -o FILE the profile is written there (atomically: nothing is written on an error) and a
summary goes to stdout (a table, or JSON with --json); without -o the profile's JSON is stdout.
A progress bar (rich) is drawn on stderr when stderr is a terminal. Exit codes: 0 done, 2 bad input
(one line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

from planner.commands.common import BadInput, Out

HELP = "measure this machine's device profile (matmul, attention and memory rates, host costs), or fit one to measured steps"

EPILOG = """\
examples:
  planner calibrate -o cpu.json                      (about a minute on a small CPU; --quick: seconds)
  planner calibrate --threads 1 --no-steps -o cpu.json   (micro-benchmarks only)
  planner calibrate --device cuda -o h200.json
  planner calibrate --from-steps measured.csv --profile h200.json -o h200-fit.json
  planner calibrate --from-steps measured.csv --profile h200.json --fit host.op_s,launch_s

--from-steps CSV: one row per measured step; columns are Plan fields (model, task, method, precision,
batch, seq, grad_ckpt, lora_rank, prompt_len, new_tokens, gpu, ...; blank = default) and measured
columns (step_s, first_step_s, tokens_per_s, prefill_s, generate_s, peak_allocated_bytes,
peak_reserved_bytes, cublas_workspaces_in_peak_bytes). The target: step_s for training rows,
generate_s for generate rows.

exit codes: 0 done, 2 bad input
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group("calibration (micro-benchmarks on this machine)")
    g.add_argument("--device", metavar="{cpu,cuda}", help="what to measure (default: cpu)")
    g.add_argument("--quick", action="store_true", help="fewer points and repeats: seconds, for tests (rougher figures)")
    g.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads while measuring (default: torch's)")
    g.add_argument("--model", action="append", metavar="MODEL",
                   help="time this model's Linear layers in the matmul sweep too (a catalog id, hub id or config.json; "
                        "repeatable): their measured rates replace the shape model's guess for them (CPU)")
    g.add_argument("--no-steps", action="store_true",
                   help="micro-benchmarks only: skip fitting the per-layer, per-model and per-step host costs to the "
                        "built-in calibration programs (CPU; needs transformers and peft)")
    g = p.add_argument_group("fit to measured steps")
    g.add_argument("--from-steps", metavar="FILE.csv", help="fit the profile's free parameters to these whole-step times")
    g.add_argument("--profile", metavar="BASE", help="the profile to start from (a catalog id or a file from calibrate -o)")
    g.add_argument("--fit", metavar="PARAMS",
                   help="comma list of the profile's parameters to fit (default: host.op_s,host.module_s,launch_s)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--out", metavar="FILE", help="write the profile JSON there (default: print it on stdout)")
    g.add_argument("--json", action="store_true", help="with -o: the summary as JSON on stdout")


def _check_out(path: str | None) -> Path | None:
    """The output path, checked before any work: its folder exists and can be written to."""
    if path is None:
        return None
    if not path.strip():
        raise BadInput("out: give a file name")
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInput(f"out: {path} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"out: no such directory '{parent}' for {path}")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise BadInput(f"out: cannot write {path} (permission denied)")
    return p


def _write(p: Path, text: str) -> None:
    """Write atomically: a temporary file in the same folder, renamed over the target."""
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise BadInput(f"out: cannot write {p}: {e.strerror or e}") from None


class _Bar:
    """A transient rich progress bar on `stream` (imported only when drawn)."""

    def __init__(self, stream: TextIO, what: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(f"{what} {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(file=stream), transient=True)  # fmt: skip
        self.task: Any = None
        self.bar.start()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task(stage, total=total)
        self.bar.update(self.task, completed=done, total=total, description=stage)

    def close(self) -> None:
        self.bar.stop()


def _bar(out: Out, what: str) -> _Bar | None:
    stream = getattr(out, "stderr", None)
    isatty = getattr(stream, "isatty", None)
    if stream is None or not (callable(isatty) and isatty()):
        return None  # piped or captured stderr: no control codes in logs
    try:
        return _Bar(stream, what)
    except ImportError:
        return None


def run(args: argparse.Namespace, out: Out) -> int:
    out_path = _check_out(args.out)
    if args.from_steps:
        return _run_fit(args, out, out_path)
    for flag, given in (("--profile", args.profile), ("--fit", args.fit)):
        if given is not None:
            raise BadInput(f"{flag.lstrip('-')}: {flag} only applies with --from-steps FILE.csv")
    from planner.backends.calibrate import CalibrationError, check_device, run_calibration

    device = args.device or "cpu"
    try:
        check_device(device)
        if args.threads is not None and args.threads < 1:
            raise CalibrationError(f"threads: must be >= 1 (got {args.threads})")
    except CalibrationError as e:
        raise BadInput(str(e)) from None
    layer_dims: tuple[tuple[int, int], ...] = ()
    if getattr(args, "model", None):
        from planner.architecture import ModelError
        from planner.backends.calibrate import linear_layer_dims
        from planner.models import load_model

        try:
            layer_dims = linear_layer_dims(load_model(m) for m in args.model)
        except ModelError as e:
            raise BadInput(str(e)) from None
    bar = _bar(out, "calibrating")
    try:
        cal = run_calibration(device, quick=args.quick, progress=bar, threads=args.threads,
                              steps=False if getattr(args, "no_steps", False) else None, layer_dims=layer_dims)
    except CalibrationError as e:
        raise BadInput(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    if cal.notes.get("load"):
        out.warn(cal.notes["load"])
    if cal.notes.get("step fit") and device == "cpu":
        out.warn(f"step fit {cal.notes['step fit']}")
    import json

    text = json.dumps(cal.profile.model_dump(mode="json"), indent=2) + "\n"
    if out_path is None:
        out.stdout.write(text)
        return 0
    _write(out_path, text)
    if args.json:
        out.print(json.dumps(_summary_json(cal, out_path), indent=2))
    else:
        _print_summary(cal, out_path, out)
    return 0


# ---- the calibration's summary --------------------------------------------------------------------
def _us(s: float) -> str:
    return f"{s * 1e6:.2f} us"


def _decades(curve: Any) -> list[float]:
    lo, hi = curve.points[0][0], curve.points[-1][0]
    sizes = [10.0**e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
    return [lo, *[s for s in sizes if lo < s < hi], hi]


def _size(x: float, unit: str = "") -> str:
    for div, pre in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g} {pre}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _curve_rows(name: str, curves: dict[str, Any], unit: str, out: Out) -> None:
    if not curves:
        return
    dts = list(curves)
    sizes = sorted({s for c in curves.values() for s in _decades(c)})
    if len(sizes) > 9:
        sizes = [sizes[round(i * (len(sizes) - 1) / 8)] for i in range(9)]
    w = max(10, *(len(d) + 2 for d in dts))
    out.print(f"{name} (achieved G{unit}/s against the op's {unit}s)")
    out.print("  " + f"{unit + 's':>12}" + "".join(f"{d:>{w}}" for d in dts))
    for s in sizes:
        out.print("  " + f"{_size(s):>12}" + "".join(f"{curves[d].rate(s) / 1e9:>{w}.3g}" for d in dts))
    out.print("  " + f"{'best point':>12}" + "".join(f"{max(r for _, r in curves[d].points) / 1e9:>{w}.3g}" for d in dts))


def _print_summary(cal: Any, path: Path, out: Out) -> None:
    p = cal.profile
    out.print(f"wrote {path}: profile {p.id} ({p.name}), measured in {cal.elapsed_s:.0f} s")
    out.print("")
    _curve_rows("matmul", p.matmul, "FLOP", out)
    layouts = {f"{d} {lay}": c for d, cs in p.matmul_layouts.items() for lay, c in cs.items()}
    if layouts:
        out.print("")
        _curve_rows("matmul by operand layout (linear: a Linear's forward; grad_input, grad_weight: its backward)",
                    layouts, "FLOP", out)
    out.print("")
    _curve_rows("attention (causal SDPA)", p.attention, "FLOP", out)
    if cal.notes.get("attention backward/forward"):
        out.print(f"  backward / forward time: {cal.notes['attention backward/forward']}")
    out.print("")
    _curve_rows("memory-bound ops (all dtypes, then by the op's dtype)", {"all": p.memory, **p.memory_by_dtype},
                "byte", out)
    out.print("")
    h = p.host
    fit = cal.step_fit
    fitted = set(fit.fit.params) if fit is not None and fit.fit is not None else set()
    out.print("host costs" + ("" if p.asynchronous else " (the CPU: host and device are one thread; an op = host + device)"))
    for label, key, v in (("op (a kernel)", "op_s", h.op_s), ("op under autograd", "grad_op_s", h.op_cost("grad")),
                          ("op in backward", "backward_op_s", h.op_cost("backward")),
                          ("view (metadata only)", "view_s", h.view_s), ("module call", "module_s", h.module_s),
                          ("decoder layer", "layer_s", h.layer_s), ("model forward", "model_s", h.model_s),
                          ("generate step", "generate_step_s", h.generate_step_s),
                          ("sync (.item())", "sync_s", h.sync_s), ("optimizer, per tensor", "optimizer_tensor_s", h.optimizer_tensor_s),
                          ("launch_s (device)", "launch_s", p.launch_s)):  # fmt: skip
        how = "  fitted to the calibration programs" if f"host.{key}" in fitted else ""
        out.print(f"  {label:<24}{_us(v):>12}{how}")
    if fit is not None and fit.fit is not None:
        out.print("")
        out.print(f"step fit: {len(fit.cases)} built-in calibration programs, timed and predicted ({fit.elapsed_s:.0f} s)")
        width = max(len(r.label) for r in fit.fit.rows)
        out.print(f"  {'program':<{width}}  {'measured':>10} {'spread':>7} {'predicted':>10} {'error':>8}")
        for r, c in zip(fit.fit.rows, fit.cases):
            out.print(f"  {r.label:<{width}}  {r.measured * 1e3:>8.3f}ms {c.spread:>7.0%} {r.predicted * 1e3:>8.3f}ms "
                      f"{r.error:>+8.1%}")
        out.print(f"  |error|: median {fit.fit.median_abs_error:.1%}, worst {fit.fit.worst_abs_error:.1%}")
    out.print("")
    out.print("check (forward timed vs predicted from "
              + ("the micro-benchmarks' figures, before the step fit" if fit is not None else "this profile")
              + ", counting its ops):")
    for c in cal.checks:
        out.print(f"  {c.name}")
        out.print(f"    measured {c.measured_s * 1e3:.3f} ms (spread {c.spread:.0%}), predicted {c.predicted_s * 1e3:.3f} ms"
                  f" ({c.ops} aten ops, {c.modules} module calls): error {c.error:+.1%}")


def _summary_json(cal: Any, path: Path) -> dict[str, Any]:
    p = cal.profile
    return {
        "profile": str(path), "id": p.id, "device": p.device, "elapsed_s": cal.elapsed_s,
        "matmul": {d: [list(pt) for pt in c.points] for d, c in p.matmul.items()},
        "matmul_layouts": {d: {lay: [list(pt) for pt in c.points] for lay, c in cs.items()}
                           for d, cs in p.matmul_layouts.items()},
        "attention": {d: [list(pt) for pt in c.points] for d, c in p.attention.items()},
        "memory": [list(pt) for pt in p.memory.points],
        "host": p.host.model_dump(), "launch_s": p.launch_s, "notes": cal.notes,
        "step_fit": None if cal.step_fit is None or cal.step_fit.fit is None else {
            "elapsed_s": cal.step_fit.elapsed_s, "fitted": cal.step_fit.fit.params,
            "rows": [{"program": r.label, "measured_s": r.measured, "predicted_s": r.predicted, "error": r.error,
                      "spread": c.spread} for r, c in zip(cal.step_fit.fit.rows, cal.step_fit.cases)],
            "median_abs_error": cal.step_fit.fit.median_abs_error, "worst_abs_error": cal.step_fit.fit.worst_abs_error},
        "check": [{"name": c.name, "measured_s": c.measured_s, "predicted_s": c.predicted_s, "error": c.error,
                   "spread": c.spread, "ops": c.ops, "module_calls": c.modules} for c in cal.checks],
    }  # fmt: skip


# ---- --from-steps ---------------------------------------------------------------------------------
def _run_fit(args: argparse.Namespace, out: Out, out_path: Path | None) -> int:
    for flag, given in (("--device", args.device), ("--threads", args.threads)):
        if given is not None:
            raise BadInput(f"{flag.lstrip('-')}: {flag} does not apply with --from-steps (it fits a profile, measuring nothing)")
    if args.quick:
        raise BadInput("quick: --quick does not apply with --from-steps (it fits a profile, measuring nothing)")
    if getattr(args, "no_steps", False):
        raise BadInput("no-steps: --no-steps does not apply with --from-steps (it fits a profile, measuring nothing)")
    if not args.profile:
        raise BadInput("profile: --from-steps needs --profile BASE (a catalog id or a file from planner calibrate -o)")
    from planner.backends.calibrate import StepsError, fit_profile, parse_fit_params, read_steps
    from planner.profiles import ProfileError, load_profile

    try:
        params = parse_fit_params(args.fit)
        base = load_profile(args.profile)
        rows = read_steps(args.from_steps)
    except (StepsError, ProfileError) as e:
        raise BadInput(str(e)) from None
    import importlib

    try:
        cost = importlib.import_module("planner.engine.timing")
    except ModuleNotFoundError as e:
        if e.name != "planner.engine.timing":
            raise
        cost = None
    step_seconds = getattr(cost, "step_seconds", None)
    if step_seconds is None:
        raise BadInput("from-steps: this planner has no op-level time model yet (planner.engine.timing.step_seconds); "
                       "fit with it once it is installed")
    bar = _bar(out, "fitting")
    started = time.perf_counter()
    try:
        fit = fit_profile(base, rows, step_seconds, params, csv_name=str(args.from_steps),
                          progress=(lambda d, t: bar("evaluations", d, t)) if bar is not None else None)
    except StepsError as e:
        raise BadInput(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    import json

    text = json.dumps(fit.profile.model_dump(mode="json"), indent=2) + "\n"
    if out_path is None:
        out.stdout.write(text)
        return 0
    _write(out_path, text)
    if args.json:
        out.print(json.dumps(_fit_json(fit, out_path, time.perf_counter() - started), indent=2))
    else:
        _print_fit(fit, out_path, out)
    return 0


def _fit_json(fit: Any, path: Path, elapsed: float) -> dict[str, Any]:
    return {
        "profile": str(path), "id": fit.profile.id, "elapsed_s": elapsed, "evaluations": fit.evaluations,
        "objective": fit.objective, "base": fit.base, "fitted": fit.params,
        "rows": [{"row": r.label, "target": r.target, "measured_s": r.measured, "predicted_s": r.predicted,
                  "error": r.error} for r in fit.rows],
        "median_abs_error": fit.median_abs_error, "worst_abs_error": fit.worst_abs_error,
    }  # fmt: skip


def _print_fit(fit: Any, path: Path, out: Out) -> None:
    out.print(f"wrote {path}: profile {fit.profile.id}, {len(fit.params)} parameters fitted to {len(fit.rows)} rows "
              f"({fit.evaluations} evaluations)")
    for name, v in fit.params.items():
        out.print(f"  {name:<26} {fit.base[name] * 1e6:>10.3f} us -> {v * 1e6:>10.3f} us")
    out.print("")
    width = max(len(r.label) for r in fit.rows)
    out.print(f"  {'row':<{width}}  {'measured':>11} {'predicted':>11} {'error':>8}")
    for r in fit.rows:
        out.print(f"  {r.label:<{width}}  {r.measured:>10.4f}s {r.predicted:>10.4f}s {r.error:>+8.1%}")
    out.print("")
    out.print(f"|error| (predicted / measured - 1): median {fit.median_abs_error:.1%}, worst {fit.worst_abs_error:.1%}")
