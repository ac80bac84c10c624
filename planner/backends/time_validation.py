"""The engine's step time against real CPU steps: `python -m planner.backends.time_validation
--out reports/validation/time-cpu.md` (and the CSV beside it).

In one run, on this machine, torch at 1 thread (torch.set_num_threads(1) for everything timed):
1. calibrate a CPU profile's micro-benchmarks (planner.backends.calibrate.run_calibration, steps=False),
   the cases' models' Linear layers timed by the matmul sweep as `planner calibrate --model` times a
   user's (their measured offsets, MatmulShapes.measured);
2. time every case and the calibration's built-in programs (which are not among the cases: 1-4
   layers of hidden 32 at batch 1 x 8 tokens, and two medium sft steps) with
   planner.backends.timing.time_steps, all of their repeats interleaved (round after round over all
   of them, each round in another order; a cheap program sampled three times a round), a sample being
   the median of one call's steps after its warm-up step, a figure the mean of its samples (the
   quietest sample and the median printed beside it); then fit
   the profile's step-fit parameters to
   the calibration programs (planner.backends.calibrate.fit_timed_cases): timed in the same rounds,
   a drift of the machine's speed hits them and the cases alike;
3. predict each with planner.engine.timing.step_seconds(plan, model, profile), and its split into
   device compute and host time (step_time);
4. diagnose: the engine's op counts per kind against what an OpRecorder records from the same
   program (planner.backends.step_programs.op_list_check), and the measured time of each phase of
   the step against the engine's price of that part of its program.

Cases: sft (full and LoRA, with and without gradient checkpointing, fp32 and bf16), HF generate,
rm and dpo, on llama-family configs written as config.json files into a temporary folder (a llama
2 x 64, a qwen2 3 x 96 with q/k/v biases, a llama 4 x 128, a llama 8 x 256), batch 1-8, 64-1024
tokens, sized so that some are host-bound and some compute-bound and each step stays under ~1 s.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.backends.step_programs import (CHEAP_SAMPLE_S, CHEAP_SAMPLES, MAX_STEPS, SAMPLE_S, Case, llama_config,
                                           write_config)
from planner.profiles import DTYPES

GOAL_MEDIAN, GOAL_WORST = 0.10, 0.25
# the worst cases (at most OP_TIMED, each off by more than OP_TIMED_ABOVE) get their ops timed in the program
OP_TIMED, OP_TIMED_ABOVE = 6, GOAL_MEDIAN
PHASE_RUNS = 2  # runs of each case for the time per phase (the smaller median of each phase is kept)

# name: (config, short description)
MODELS: dict[str, dict[str, Any]] = {
    "llama-2x64": llama_config(2, 64, 128, heads=4, kv_heads=2, vocab=1000),
    "qwen2-3x96": llama_config(3, 96, 256, heads=4, kv_heads=2, vocab=2000, family="qwen2"),
    "llama-4x128": llama_config(4, 128, 352, heads=4, kv_heads=2, vocab=4000),
    "llama-8x256": llama_config(8, 256, 688, heads=8, kv_heads=4, vocab=8000),
}

# (model, plan fields): the full suite
FULL: tuple[tuple[str, dict[str, Any]], ...] = (
    ("llama-2x64", dict(task="sft", precision="bf16", batch=2, seq=64)),
    ("llama-2x64", dict(task="sft", precision="fp32", batch=4, seq=128)),
    ("llama-2x64", dict(task="sft", method="lora", lora_rank=8, precision="bf16", batch=2, seq=64)),
    ("llama-2x64", dict(task="sft", precision="bf16", batch=2, seq=128, grad_ckpt=True)),
    ("qwen2-3x96", dict(task="sft", precision="bf16", batch=2, seq=128)),
    ("qwen2-3x96", dict(task="sft", method="lora", lora_rank=8, precision="fp32", batch=4, seq=128, grad_ckpt=True)),
    ("llama-4x128", dict(task="sft", precision="fp32", batch=4, seq=256)),
    ("llama-4x128", dict(task="sft", precision="bf16", batch=8, seq=128)),
    ("llama-4x128", dict(task="sft", method="lora", lora_rank=16, precision="bf16", batch=2, seq=512)),
    ("llama-4x128", dict(task="sft", precision="fp32", batch=2, seq=512, grad_ckpt=True)),
    ("llama-8x256", dict(task="sft", precision="bf16", batch=1, seq=1024)),
    ("llama-8x256", dict(task="sft", precision="fp32", batch=4, seq=128)),
    ("llama-8x256", dict(task="sft", method="lora", lora_rank=16, precision="fp32", batch=2, seq=256)),
    ("llama-8x256", dict(task="sft", method="lora", lora_rank=16, precision="bf16", batch=1, seq=512, grad_ckpt=True)),
    ("llama-2x64", dict(task="generate", precision="bf16", batch=1, prompt_len=16, new_tokens=16)),
    ("llama-2x64", dict(task="generate", precision="fp32", batch=4, prompt_len=64, new_tokens=32)),
    ("qwen2-3x96", dict(task="generate", precision="bf16", batch=2, prompt_len=32, new_tokens=16)),
    ("llama-4x128", dict(task="generate", precision="bf16", batch=1, prompt_len=128, new_tokens=32)),
    ("llama-8x256", dict(task="generate", precision="fp32", batch=2, prompt_len=256, new_tokens=16)),
    ("llama-2x64", dict(task="rm", precision="bf16", batch=2, seq=64)),
    ("llama-4x128", dict(task="rm", precision="fp32", batch=2, seq=256)),
    ("llama-2x64", dict(task="dpo", precision="bf16", batch=1, seq=64)),
    ("llama-4x128", dict(task="dpo", precision="bf16", batch=2, seq=128)),
    ("llama-2x64", dict(task="dpo", method="lora", lora_rank=8, precision="fp32", batch=2, seq=64)),
)
# a smoke run (tests): three tiny cases
SMOKE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("llama-2x64", dict(task="sft", precision="bf16", batch=1, seq=32)),
    ("llama-2x64", dict(task="generate", precision="bf16", batch=1, prompt_len=8, new_tokens=4)),
    ("llama-2x64", dict(task="sft", method="lora", lora_rank=4, precision="fp32", batch=1, seq=32)),
)
SUITES = {"full": FULL, "smoke": SMOKE}


def label_of(model: str, kw: dict[str, Any]) -> str:
    task = kw.get("task", "sft")
    parts = [task]
    if task != "generate":
        parts.append(kw.get("method", "full") + (f" r{kw['lora_rank']}" if kw.get("method") == "lora" else ""))
    parts.append(kw.get("precision", "bf16"))
    parts.append(model)
    if task == "generate":
        parts.append(f"b{kw.get('batch', 1)} p{kw['prompt_len']}+{kw['new_tokens']}")
    else:
        parts.append(f"b{kw.get('batch', 1)} s{kw['seq']}")
    if kw.get("grad_ckpt"):
        parts.append("ckpt")
    return " ".join(parts)


def validation_cases(root: str | Path, which: str = "full") -> list[Case]:
    """The suite's cases, their models' config.json files written under `root`."""
    from planner.specs import Plan

    paths = {name: write_config(root, name, cfg) for name, cfg in MODELS.items()}
    out = []
    for model, kw in SUITES[which]:
        plan = Plan(model=paths[model], **kw)
        steps, warmup = (2, 1) if plan.task == "generate" else (3, 1)
        out.append(Case(label_of(model, kw), plan, steps=steps, warmup=warmup))
    return out


# ---- the run ----------------------------------------------------------------------------------------
@dataclass
class OpTime:
    """Ops of one name and dtype in one phase: how many, their in-program seconds (each timed
    around its dispatch below autograd) and what the profile prices that at (op_s + device)."""

    phase: str
    name: str
    dtype: str
    count: int = 0
    measured_s: float = 0.0
    priced_s: float = 0.0


def op_times(case: Case, profile, warmup: int = 2, steps: int = 3, threads: int | None = 1) -> list[OpTime]:
    """`steps` steps of the case (after `warmup`) with every aten op timed where it runs (perf_counter
    around the op inside a TorchDispatchMode: the kernel and the dispatch below the mode, called
    from Python), against what `profile` prices the same call at: host.op_s (a no-grad op called
    from Python) + its device time (launch_s + max(FLOPs / rate, bytes / memory rate), as
    planner.backends.calibrate.Prices prices a counted op). Views and syncs are left out. Per step
    and per (phase, op, dtype) the times are summed; the figure is the median over the steps. Sorted
    by measured - priced, largest first."""
    import gc

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from planner.backends.calibrate import Prices, classify
    from planner.backends.step_programs import frozen_heap
    from planner.backends.timing import run_step, timed_program

    prices = Prices.of(profile)
    agg: dict[tuple[str, str, str], OpTime] = {}
    per_step: list[dict[tuple[str, str, str], float]] = []

    class _Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            dt = time.perf_counter() - t0
            op = classify(torch, func, args, kwargs, out)
            if op.kind in ("view", "sync"):
                return out
            key = (str(ctx.tracker.phase), op.name, op.dtype)
            rec = agg.get(key)
            if rec is None:
                rec = agg[key] = OpTime(*key)
            if key not in per_step[-1]:  # count and price: those of the last step (the same every step)
                rec.count, rec.priced_s = 0, 0.0
            rec.count += 1
            per_step[-1][key] = per_step[-1].get(key, 0.0) + dt
            host, device = prices.op(op)
            rec.priced_s += host + device
            return out

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with frozen_heap(), timed_program(case.tech, case.plan, case.config) as ctx:
            for i in range(warmup):
                run_step(case.tech, ctx, i)
            for i in range(steps):
                gc.collect()
                per_step.append({})
                with _Timed():
                    run_step(case.tech, ctx, warmup + i)
    finally:
        torch.set_num_threads(before)
    for key, rec in agg.items():
        rec.measured_s = statistics.median([s.get(key, 0.0) for s in per_step])
    return sorted(agg.values(), key=lambda r: -(r.measured_s - r.priced_s))


@dataclass
class Row:
    case: Case
    model: str
    predicted_s: float
    compute_s: float
    host_s: float
    ops_match: bool | None = None
    ops_note: str = ""
    phases_measured: dict[str, float] = field(default_factory=dict)
    phases_predicted: dict[str, tuple[float, float]] = field(default_factory=dict)
    op_times: list[Any] = field(default_factory=list)  # step_programs.OpTime, for the worst cases

    @property
    def measured_s(self) -> float:
        """The case's figure: the mean of its samples (planner.backends.step_programs: why)."""
        return self.case.figure

    @property
    def error(self) -> float:
        """predicted / measured - 1."""
        return self.predicted_s / self.measured_s - 1

    @property
    def error_vs_quietest(self) -> float:
        """predicted / the quietest sample - 1 (the figure of runs G and H, printed beside)."""
        return self.predicted_s / self.case.quietest - 1

    @property
    def error_vs_median(self) -> float:
        """predicted / the median of the samples - 1 (printed beside the figure's error)."""
        return self.predicted_s / self.case.median - 1


@dataclass
class Suite:
    profile: Any
    calibration: Any
    rows: list[Row]
    rounds: int
    threads: int
    started: str
    load: float
    timings: dict[str, float]

    @property
    def errors(self) -> list[float]:
        return [abs(r.error) for r in self.rows]

    @property
    def median_abs_error(self) -> float:
        return statistics.median(self.errors)

    @property
    def worst(self) -> Row:
        return max(self.rows, key=lambda r: abs(r.error))


def _model_name(case: Case) -> str:
    return Path(case.plan.model).name


def run_suite(which: str = "full", rounds: int = 5, quick_calibration: bool = False, threads: int = 1,
              diagnose: bool = True, progress: Any = None, log: Any = None) -> Suite:  # fmt: skip
    """Calibrate, time, predict and diagnose (module doc); `log(text)` is told of each stage."""
    import torch

    from planner.backends.calibrate import (calibration_cases, fit_timed_cases, linear_layer_dims, run_calibration,
                                            settings, step_fit_params)
    from planner.backends.step_programs import op_list_check, phase_times, predicted_parts, time_cases
    from planner.engine.timing import step_seconds, step_time

    say = log or (lambda text: None)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        say(f"calibrating ({'quick' if quick_calibration else 'full'}, {threads} thread(s)): micro-benchmarks")
        with tempfile.TemporaryDirectory(prefix="planner-time-validation-") as root:
            cases = validation_cases(root, which)
            # the cases' models' Linear layers timed by the sweep as well (`planner calibrate --model`
            # does the same for a user's model): what a profile for these models measures
            cal = run_calibration("cpu", quick=quick_calibration, threads=threads, progress=progress, steps=False,
                                  layer_dims=linear_layer_dims(c.model for c in cases))
            timings["calibration_s"] = time.perf_counter() - t0
            st = settings("cpu", quick_calibration)
            programs = calibration_cases(Path(root) / "calibration", st.step_programs)
            say(f"timing {len(cases)} cases and {len(programs)} calibration programs, {rounds} interleaved rounds")
            t1 = time.perf_counter()
            # the calibration programs in the same rounds as the cases: a drift of the machine's speed
            # between calibrating and timing (20-35% between runs here) would otherwise bias every case
            time_cases(programs + cases, rounds, threads=threads, progress=progress, stage="cases")
            timings["timing_s"] = time.perf_counter() - t1
            t3 = time.perf_counter()
            cal.step_fit = fit_timed_cases(cal.profile, programs, rounds, threads, step_fit_params(st.step_programs),
                                           note="; timed interleaved with the time validation's cases")
            cal.profile = profile = cal.step_fit.profile
            timings["calibration_s"] += time.perf_counter() - t3
            rows = []
            for c in cases:
                st = step_time(c.workload(), profile)
                total = step_seconds(c.plan, c.model, profile)
                assert math.isclose(total, st.total_s, rel_tol=1e-9), (c.label, total, st.total_s)
                rows.append(Row(c, _model_name(c), total, st.compute_s, st.host_s))
            t2 = time.perf_counter()
            if diagnose:
                say("diagnosing: op lists against the recorder, time per phase")
                for i, r in enumerate(rows, start=1):
                    r.ops_match, r.ops_note = op_list_check(r.case)
                    r.phases_predicted = predicted_parts(r.case, profile)
                    if progress is not None:
                        progress("diagnostics", i, 2 * len(rows))
                # the time per phase: two runs of every case, interleaved; per phase the smaller median
                for k in range(PHASE_RUNS):
                    for i, r in enumerate(rows if k % 2 == 0 else rows[::-1], start=1):
                        got = phase_times(r.case, steps=r.case.steps, warmup=r.case.warmup, threads=threads)
                        r.phases_measured = {n: min(v, r.phases_measured.get(n, v)) for n, v in got.items()}
                        if progress is not None:
                            progress("diagnostics", len(rows) + i, 2 * len(rows))
                worst = [r for r in sorted(rows, key=lambda r: -abs(r.error)) if abs(r.error) > OP_TIMED_ABOVE]
                for r in (worst or sorted(rows, key=lambda r: -abs(r.error))[:1])[:OP_TIMED]:
                    r.op_times = op_times(r.case, profile, threads=threads)
            timings["diagnostics_s"] = time.perf_counter() - t2
    finally:
        torch.set_num_threads(before)
    timings["total_s"] = time.perf_counter() - t0
    return Suite(profile, cal, rows, rounds, threads, started, load, timings)


# ---- the report -------------------------------------------------------------------------------------
def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}" if s < 0.1 else f"{s * 1e3:.0f}"


def _us(s: float) -> str:
    return f"{s * 1e6:.3g} us"


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _part_phase(part: str) -> str:
    """The tracker phase an engine part runs in ('reference/score' -> 'reference')."""
    phase, _, name = part.partition("/")
    return phase if name == "score" else name


def phase_table(row: Row) -> list[tuple[str, float | None, float | None]]:
    """(phase, measured s, predicted s) for every phase measured or priced."""
    pred: dict[str, float] = {}
    for part, (h, d) in row.phases_predicted.items():
        name = _part_phase(part)
        pred[name] = pred.get(name, 0.0) + h + d
    names = list(row.phases_measured) + [n for n in pred if n not in row.phases_measured]
    return [(n, row.phases_measured.get(n), pred.get(n)) for n in names]


def why(row: Row) -> str:
    """Where a case's error comes from, in words: the op-list check and the phases whose measured
    and predicted times differ most."""
    parts = []
    if row.ops_match is False:
        parts.append(f"op list differs ({row.ops_note.removeprefix('engine vs recorded: ')})")
    gaps = [(n, (m or 0.0) - (p or 0.0)) for n, m, p in phase_table(row)]
    gaps.sort(key=lambda g: -abs(g[1]))
    total = row.measured_s
    for n, g in gaps[:3]:
        if abs(g) >= 0.05 * total:
            parts.append(f"{n} {'under' if g > 0 else 'over'}-predicted by {_ms(abs(g))} ms")
    for o in row.op_times[:2]:
        if abs(o.measured_s - o.priced_s) >= 0.05 * total:
            parts.append(f"kernels: {o.count} {o.name} ({o.dtype}, {o.phase}) {_ms(o.measured_s)} ms in the program, "
                         f"priced {_ms(o.priced_s)} ms")
    return "; ".join(parts) or "no single phase stands out"


CSV_COLUMNS = ("case", "task", "method", "precision", "grad_ckpt", "model", "batch", "seq", "prompt_len", "new_tokens",
               "measured_s", "quietest_s", "median_s", "spread", "iqr", "samples_s", "predicted_s", "error",
               "error_vs_quietest", "error_vs_median",
               "predicted_compute_s",
               "predicted_host_s", "op_list_match", "op_list_note", "phases_measured_s", "phases_predicted_s")  # fmt: skip


def to_csv(suite: Suite) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in suite.rows:
        p = r.case.plan
        gen = p.task == "generate"
        w.writerow([
            r.case.label, p.task, p.method, p.precision, int(p.grad_ckpt), r.model, p.batch, "" if gen else p.seq,
            p.prompt_len if gen else "", p.new_tokens if gen else "", f"{r.measured_s:.6g}", f"{r.case.quietest:.6g}",
            f"{r.case.median:.6g}",
            f"{r.case.spread:.4f}", f"{r.case.iqr:.4f}", ";".join(f"{x:.6g}" for x in r.case.samples),
            f"{r.predicted_s:.6g}", f"{r.error:.4f}", f"{r.error_vs_quietest:.4f}", f"{r.error_vs_median:.4f}",
            f"{r.compute_s:.6g}",
            f"{r.host_s:.6g}", "" if r.ops_match is None else int(r.ops_match),
            r.ops_note, ";".join(f"{k}={v:.6g}" for k, v in r.phases_measured.items()),
            ";".join(f"{k}={h + d:.6g}" for k, (h, d) in r.phases_predicted.items()),
        ])  # fmt: skip
    return buf.getvalue()


def to_markdown(suite: Suite, command: str = "python -m planner.backends.time_validation",
                csv_name: str | None = None) -> str:  # fmt: skip
    from planner.backends.calibrate import cpu_model

    p = suite.profile
    h = p.host
    v = _versions()
    errs = suite.errors
    n = len(errs)
    med, worst = suite.median_abs_error, suite.worst
    within10 = sum(e <= 0.10 for e in errs)
    within25 = sum(e <= 0.25 for e in errs)
    met = med <= GOAL_MEDIAN and abs(worst.error) <= GOAL_WORST
    t = suite.timings
    L: list[str] = []
    L.append("# Step time on this CPU: the engine's prediction against real steps")
    L.append("")
    L.append(f"Generated by `{command}` (`planner/backends/time_validation.py`)"
             + (f"; every figure also in `{csv_name}`" if csv_name else "") + ".")
    L.append(f"Run started {suite.started}; machine: {cpu_model()}, {os.cpu_count()} CPUs, load average "
             f"{suite.load:.2f} at the start (a shared machine); torch threads {suite.threads} "
             f"(`torch.set_num_threads({suite.threads})` for the calibration and every timed step).")
    L.append("Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".")
    L.append(f"Runtime: calibration {t.get('calibration_s', 0):.0f} s, timing {t.get('timing_s', 0):.0f} s, "
             f"diagnostics {t.get('diagnostics_s', 0):.0f} s; total {t.get('total_s', 0):.0f} s.")
    L.append("")
    L.append("## Method")
    L.append("")
    sf0 = suite.calibration.step_fit
    fitted_names = [f"`{q.removeprefix('host.')}`" for q in (sf0.fit.params if sf0 is not None and sf0.fit else ())]
    programs = "; ".join(c.label for c in sf0.cases) if sf0 is not None else "none"
    L.append("- The profile is calibrated in the same run (`planner.backends.calibrate.run_calibration`, 1 thread): "
             f"micro-benchmarks, then {', '.join(fitted_names) or 'nothing'} fitted to its built-in calibration "
             f"programs ({programs}: none of the cases below), which are timed in the same rounds as the cases "
             "(`planner.backends.calibrate.fit_timed_cases`): a drift of this shared machine's speed between "
             "calibrating and timing hits both alike.")
    L.append(f"- Each case is timed with `planner.backends.timing.time_steps` (the dry run's program on real CPU "
             f"tensors, no tracker): {suite.rounds} rounds over all cases and calibration programs, each round in its own seeded random "
             f"order (`random.Random(round)`), a program whose sample takes under {CHEAP_SAMPLE_S:.0f} s sampled "
             f"{CHEAP_SAMPLES} times a round at random places in it; a sample is the median of one call's steps after one warm-up step (as "
             f"many steps as make {SAMPLE_S * 1e3:.0f} ms, at least 3 (generate: 2), at most {MAX_STEPS}); the "
             f"figure (measured) is the mean of the samples, for the cases and for the calibration programs the "
             f"profile is fitted to (this shared machine's speed switches between two modes ~1.5x apart every few "
             f"seconds: the mean is the time-averaged speed that a step longer than a mode's window measures by "
             f"itself; `planner/backends/step_programs.py` says why; runs G and H took the quietest sample, runs "
             f"before them the median, both printed beside it here with the error against them); spread = "
             f"(max - min) / median of the samples, IQR = interquartile range / median.")
    L.append("- Predicted: `planner.engine.timing.step_seconds(plan, model, profile)`; compute = the device "
             "time of its ops (on the CPU: size / rate of every kernel), host = the rest (per-op dispatch, module, "
             "layer and model Python). error = predicted / measured - 1.")
    L.append("- Op list: the engine's op counts per kind over the step against an OpRecorder on the same "
             "program (`planner.backends.step_programs.op_list_check`; the step's random token ids left out). "
             f"Phases: the measured time of each tracker phase ({PHASE_RUNS} more runs of every case, interleaved; "
             "per phase the smaller of the runs' medians over their steps) against the engine's price of that part "
             "of its program.")
    L.append("")
    L.append("## Profile (calibrated in this run)")
    L.append("")
    fitted = set(suite.calibration.step_fit.fit.params) if suite.calibration.step_fit is not None else set()
    L.append("| figure | value | from |")
    L.append("|---|---:|---|")
    for name, val in (("op_s", h.op_s), ("grad_op_s", h.op_cost("grad")), ("backward_op_s", h.op_cost("backward")),
                      ("view_s", h.view_s), ("module_s", h.module_s), ("layer_s", h.layer_s), ("model_s", h.model_s),
                      ("generate_step_s", h.generate_step_s), ("generate_call_s", h.generate_call_s),
                      ("loss_s", h.loss_s), ("backward_call_s", h.backward_call_s),
                      ("optimizer_step_s", h.optimizer_step_s), ("optimizer_tensor_s", h.optimizer_tensor_s),
                      ("checkpoint_s", h.checkpoint_s), ("saved_hook_s", h.saved_hook_s),
                      ("sync_s", h.sync_s)):  # fmt: skip
        src = "fitted to the calibration programs" if f"host.{name}" in fitted else "micro-benchmark"
        L.append(f"| host.{name} | {_us(val)} | {src} |")
    L.append(f"| fixed_scale | {p.fixed_scale:.3f} (on every per-op host cost, module call and kernel fixed cost above "
             f"and below) | {'fitted to the calibration programs' if 'fixed_scale' in fitted else 'not fitted'} |")
    L.append(f"| device_scale | {p.device_scale:.3f} (the curves below include it) | "
             f"{'fitted to the calibration programs' if 'device_scale' in fitted else 'not fitted'} |")
    for dt in DTYPES:
        if f"dtype_scale.{dt}" in fitted or dt in p.dtype_scale:
            L.append(f"| dtype_scale.{dt} | {p.dtype_scale.get(dt, 1.0):.3f} (its matmul and attention curves below "
                     f"include it) | {'fitted to the calibration programs' if f'dtype_scale.{dt}' in fitted else 'not fitted'} |")
    for dt in DTYPES:
        if f"matmul_fixed_s.{dt}" in fitted or dt in p.matmul_fixed_s:
            L.append(f"| matmul_fixed_s.{dt} | {_us(p.matmul_fixed_s.get(dt, 0.0))} (a {dt} matmul's device time: this + "
                     f"FLOPs / rate) | {'fitted to the calibration programs' if f'matmul_fixed_s.{dt}' in fitted else 'not fitted'} |")
    for dt, curve in p.matmul.items():
        L.append(f"| matmul {dt} | {curve.rate(1e6) / 1e9:.3g} GFLOP/s at 1 MFLOP, {curve.rate(1e9) / 1e9:.3g} at 1 GFLOP, "
                 f"best {max(r for _, r in curve.points) / 1e9:.3g} | micro-benchmark |")
    for dt, curves in p.matmul_layouts.items():
        L.append(f"| matmul {dt} by layout | " + ", ".join(
            f"{lay} {c.rate(1e6) / 1e9:.3g} at 1 MFLOP, {c.rate(1e8) / 1e9:.3g} at 100 MFLOP" for lay, c in curves.items())
            + " (GFLOP/s) | micro-benchmark |")
    for dt, models in p.matmul_shapes.items():
        L.append(f"| matmul {dt} by shape (what prices a Linear layer's matmuls) | " + "; ".join(
            f"{lay} ({'+'.join(mo.terms)}): M=1024 K=N=128 {mo.rate(1024, 128, 128) / 1e9:.3g}, K=128 N=4096 "
            f"{mo.rate(1024, 128, 4096) / 1e9:.3g}, K=1024 N=128 {mo.rate(1024, 1024, 128) / 1e9:.3g} GFLOP/s; "
            f"{mo.points} shapes, rate error median {mo.residual:.1%}, leave-one-out time error median {mo.loo:.1%}"
            for lay, mo in models.items()) + " | micro-benchmark, fitted (MatmulShapes) |")
    if p.kernels:
        def slowness(k: str, v: Any) -> float:  # its time per byte over a copy's, at its largest call
            b = v.bytes_range[1]
            return p.memory_curve(False, k.rpartition(".")[2]).rate(b) / v.rate.rate(b) if v.rate else 0.0

        top = sorted(p.kernels.items(), key=lambda kv: -slowness(*kv))[:6]
        L.append(f"| kernels | {len(p.kernels)} measured on their own; the slowest per byte against a copy at their "
                 "largest call: " + ", ".join(f"{k} x{slowness(k, v):.2g}" for k, v in top)
                 + " | replayed from the calibration programs |")
    for dt, curve in p.attention.items():
        L.append(f"| attention {dt} | {curve.rate(1e8) / 1e9:.3g} GFLOP/s at 100 MFLOP, best "
                 f"{max(r for _, r in curve.points) / 1e9:.3g} | micro-benchmark |")
    from planner.backends.calibrate import AttentionShape

    for dt, models in p.attention_shapes.items():
        def at(mo: Any, ps: str, dim: int) -> str:  # the calibration's own reference shapes (decode: one row)
            a = AttentionShape(1, 4, 2, 1, 512, dim) if ps == "decode" else AttentionShape(2, 4, 2, 512, 512, dim)
            return f"{mo.rate(*a.mkn(2.5 if ps == 'backward' else 1.0)) / 1e9:.3g}"

        L.append(f"| attention {dt} by shape (what prices SDPA) | " + "; ".join(
            f"{ps} ({'+'.join(mo.terms)}): {'B=1 H=4 L=512' if ps == 'decode' else 'B=2 H=4 S=512'} D=16 "
            f"{at(mo, ps, 16)}, D=64 {at(mo, ps, 64)} GFLOP/s; {mo.points} shapes, rate error median "
            f"{mo.residual:.1%}, leave-one-out time error median {mo.loo:.1%}" for ps, mo in models.items())
            + " | micro-benchmark, fitted (MatmulShapes) |")
    L.append(f"| memory | {p.memory.rate(1e4) / 1e9:.3g} GB/s at 10 kB, {p.memory.rate(1e6) / 1e9:.3g} at 1 MB, "
             f"{p.memory.rate(1e8) / 1e9:.3g} at 100 MB (all dtypes) | micro-benchmark |")
    for label, table in (("memory", p.memory_by_dtype), ("memory in place", p.memory_inplace_by_dtype)):
        for dt, curve in table.items():
            L.append(f"| {label} {dt} | {curve.rate(1e4) / 1e9:.3g} GB/s at 10 kB, {curve.rate(1e6) / 1e9:.3g} at 1 MB, "
                     f"{curve.rate(1e8) / 1e9:.3g} at 100 MB | micro-benchmark (that dtype's kinds) |")
    sf = suite.calibration.step_fit
    if sf is not None and sf.fit is not None:
        L.append("")
        L.append(f"Step fit residuals (measured / predicted - 1 over its {len(sf.cases)} calibration programs; "
                 f"median |error| {sf.fit.median_abs_error:.1%}, worst {sf.fit.worst_abs_error:.1%}):")
        L.append("")
        L.append("| calibration program | measured ms | spread | predicted ms | residual |")
        L.append("|---|---:|---:|---:|---:|")
        for r, c in zip(sf.fit.rows, sf.cases):
            L.append(f"| {r.label} | {_ms(r.measured)} | {c.spread:.0%} | {_ms(r.predicted)} | "
                     f"{r.measured / r.predicted - 1:+.1%} |")
    L.append("")
    L.append("## Summary")
    L.append("")
    L.append(f"{n} cases: median |error| **{med:.1%}**, worst **{abs(worst.error):.1%}** ({worst.case.label}); "
             f"{within10} within 10%, {within25} within 25%. The goal (median within {GOAL_MEDIAN:.0%}, worst within "
             f"{GOAL_WORST:.0%}) is {'met' if met else 'not met'}.")
    for what, errs in (("the quietest sample of each case (the figure of runs G and H)",
                        [abs(r.error_vs_quietest) for r in suite.rows]),
                       ("the median of each case's samples (the figure of runs before G)",
                        [abs(r.error_vs_median) for r in suite.rows])):
        L.append(f"- Against {what} instead, the same profile: median |error| {statistics.median(errs):.1%}, worst "
                 f"{max(errs):.1%}; {sum(e <= 0.10 for e in errs)} within 10%, {sum(e <= 0.25 for e in errs)} within "
                 "25%.")
    host_bound = [r for r in suite.rows if r.host_s > r.compute_s]
    compute_bound = [r for r in suite.rows if r.host_s <= r.compute_s]
    for name, rs in (("host-bound (predicted host > compute)", host_bound), ("compute-bound", compute_bound)):
        if rs:
            e = [abs(r.error) for r in rs]
            bias = statistics.median([r.error for r in rs])
            L.append(f"- {name}: {len(rs)} cases, median |error| {statistics.median(e):.1%}, worst {max(e):.1%}, "
                     f"median signed error {bias:+.1%}.")
    by_task: dict[str, list[Row]] = {}
    for r in suite.rows:
        by_task.setdefault(r.case.plan.task, []).append(r)
    for r in suite.rows:
        by_task.setdefault(r.case.plan.precision, []).append(r)
    for task, rs in by_task.items():
        e = [abs(r.error) for r in rs]
        L.append(f"- {task}: {len(rs)} cases, median |error| {statistics.median(e):.1%}, worst {max(e):.1%}, "
                 f"median signed error {statistics.median([r.error for r in rs]):+.1%}.")
    L.append("")
    L.append("## Cases")
    L.append("")
    L.append("| case | measured ms | quietest ms | median ms | spread | IQR | predicted ms | error | error vs quietest | "
             "error vs median | compute ms | host ms | host share | op list |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in suite.rows:
        ops = "—" if r.ops_match is None else ("same" if r.ops_match else r.ops_note.removeprefix("engine vs recorded: "))
        flag = " **" if abs(r.error) > GOAL_WORST else ""
        L.append(f"| {r.case.label} | {_ms(r.measured_s)} | {_ms(r.case.quietest)} | {_ms(r.case.median)} | "
                 f"{r.case.spread:.0%} | {r.case.iqr:.0%} | {_ms(r.predicted_s)} | {flag.strip()}{r.error:+.1%}"
                 f"{flag.strip()} | {r.error_vs_quietest:+.1%} | {r.error_vs_median:+.1%} | {_ms(r.compute_s)} | "
                 f"{_ms(r.host_s)} | {r.host_s / r.predicted_s:.0%} | {ops} |")
    misses = [r for r in suite.rows if abs(r.error) > GOAL_MEDIAN]
    if misses:
        L.append("")
        L.append(f"## Cases off by more than {GOAL_MEDIAN:.0%}, and why")
        L.append("")
        for r in sorted(misses, key=lambda r: -abs(r.error)):
            L.append(f"- **{r.case.label}** ({r.error:+.1%}): {why(r) if r.phases_measured or r.ops_match is not None else 'not diagnosed'}")
    L.extend(_gaps(suite))
    timed = [r for r in suite.rows if r.op_times]
    if timed:
        L.append("")
        L.append("## Kernels in the program: measured / priced (the worst cases)")
        L.append("")
        L.append("Three steps of each (the median per op over them), every aten op timed where it runs (perf_counter around the op inside a "
                 "TorchDispatchMode: its kernel and its dispatch below autograd, called from Python; views and syncs "
                 "left out) against what the profile prices that at (host.op_s + the op's device time); the ops with "
                 "the largest gap, and the totals. The mode's own Python between ops slows the step down (more "
                 "cache misses): the totals can exceed the step.")
        for r in sorted(timed, key=lambda r: -abs(r.error)):
            m = sum(o.measured_s for o in r.op_times)
            pr = sum(o.priced_s for o in r.op_times)
            L.append("")
            L.append(f"**{r.case.label}** ({r.error:+.1%}; measured step {_ms(r.measured_s)} ms): its ops {_ms(m)} ms "
                     f"in the program, {_ms(pr)} ms priced")
            L.append("")
            L.append("| phase | op | dtype | count | measured ms | priced ms | measured / priced |")
            L.append("|---|---|---|---:|---:|---:|---:|")
            for o in r.op_times[:6]:
                ratio = f"{o.measured_s / o.priced_s:.1f}" if o.priced_s > 0 else "—"
                L.append(f"| {o.phase} | {o.name} | {o.dtype} | {o.count} | {_ms(o.measured_s)} | {_ms(o.priced_s)} | "
                         f"{ratio} |")
    if any(r.phases_measured for r in suite.rows):
        L.append("")
        L.append("## Time per phase: measured / predicted (ms)")
        L.append("")
        names: list[str] = []
        for r in suite.rows:
            for nm, _, _ in phase_table(r):
                if nm not in names:
                    names.append(nm)
        L.append("| case | " + " | ".join(names) + " |")
        L.append("|---|" + "---:|" * len(names))
        for r in suite.rows:
            cells = {nm: (m, pr) for nm, m, pr in phase_table(r)}
            out = []
            for nm in names:
                m, pr = cells.get(nm, (None, None))
                out.append("" if m is None and pr is None else f"{_ms(m) if m is not None else '—'} / "
                           f"{_ms(pr) if pr is not None else '—'}")
            L.append(f"| {r.case.label} | " + " | ".join(out) + " |")
    return "\n".join(L) + "\n"


def _gaps(suite: Suite) -> list[str]:
    """Bullets: per phase, the median of measured - predicted over the cases that have it; per kernel
    (name, dtype) over the op-timed cases, the summed gap between in-program and priced time."""
    per: dict[str, list[tuple[float, float]]] = {}
    for r in suite.rows:
        for name, m, p in phase_table(r):
            if m is not None or p is not None:
                per.setdefault(name, []).append((m or 0.0, p or 0.0))
    if not per:
        return []
    out = ["", "## Where the time is missed", "",
           "Per phase, over the cases that have it: the median of measured - predicted, and of measured / predicted "
           "(from the time per phase below; a phase the engine does not price shows predicted 0)."]
    out.append("")
    out.append("| phase | cases | median measured - predicted ms | median measured / predicted |")
    out.append("|---|---:|---:|---:|")
    for name, mp in per.items():
        ratios = [m / p for m, p in mp if p > 0]
        out.append(f"| {name} | {len(mp)} | {statistics.median([m - p for m, p in mp]) * 1e3:+.3g} | "
                   f"{statistics.median(ratios):.2f} |" if ratios else
                   f"| {name} | {len(mp)} | {statistics.median([m - p for m, p in mp]) * 1e3:+.3g} | — (not priced) |")
    kern: dict[tuple[str, str], list[float]] = {}
    for r in suite.rows:
        for o in r.op_times:
            k = kern.setdefault((o.name, o.dtype), [0.0, 0.0, 0])
            k[0] += o.measured_s
            k[1] += o.priced_s
            k[2] += 1
    if kern:
        top = sorted(kern.items(), key=lambda kv: -(kv[1][0] - kv[1][1]))[:6]
        out.append("")
        out.append(f"Kernels over the {sum(1 for r in suite.rows if r.op_times)} op-timed cases (below), summed: "
                   + "; ".join(f"{n} ({dt}) {_ms(m)} ms in the program vs {_ms(p)} ms priced"
                               for (n, dt), (m, p, _) in top) + ".")
    return out


# ---- command line -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m planner.backends.time_validation", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/validation/time-cpu.md", help="the markdown table (the CSV goes beside it)")
    ap.add_argument("--suite", choices=sorted(SUITES), default="full")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the cases")
    ap.add_argument("--quick-calibration", action="store_true", help="calibrate with --quick (seconds, rougher)")
    ap.add_argument("--no-diagnose", action="store_true", help="skip the op-list check and the time per phase")
    ap.add_argument("--profile-out", metavar="FILE.json", help="also write the profile calibrated in the run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(f"[time-validation] {text}", file=sys.stderr, flush=True)

    suite = run_suite(args.suite, rounds=args.rounds, quick_calibration=args.quick_calibration,
                      diagnose=not args.no_diagnose, log=log)  # fmt: skip
    cmd = "python -m planner.backends.time_validation --out " + str(args.out)
    if args.suite != "full":
        cmd += f" --suite {args.suite}"
    if args.rounds != 5:
        cmd += f" --rounds {args.rounds}"
    if args.quick_calibration:
        cmd += " --quick-calibration"
    csv_path = write_report(suite, out, cmd, args.profile_out)
    log(f"wrote {out} and {csv_path}: {summary_line(suite)}")
    return 0


def write_report(suite: Suite, out: Path, cmd: str, profile_out: str | None = None) -> Path:
    """The markdown table at `out`, the CSV beside it (and the calibrated profile at `profile_out`),
    each written whole (a temporary file renamed): an interrupted run leaves the old tables."""
    csv_path = out.with_suffix(".csv")
    files = [(out, to_markdown(suite, cmd, csv_path.name)), (csv_path, to_csv(suite))]
    if profile_out:
        import json

        files.append((Path(profile_out), json.dumps(suite.profile.model_dump(mode="json"), indent=1) + "\n"))
    for path, text in files:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return csv_path


def summary_line(suite: Suite) -> str:
    return (f"{len(suite.rows)} cases, step time median |error| {suite.median_abs_error:.1%}, worst "
            f"{abs(suite.worst.error):.1%} ({suite.worst.case.label}); {suite.timings['total_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
