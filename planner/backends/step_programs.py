"""Whole programs timed on this CPU and predicted by the engine: what `planner calibrate` fits its
host costs to (a built-in set of tiny llama-family programs) and what the time validation
(planner.backends.time_validation) checks the engine against.

A case is a technique's step on a plan whose model is a config.json written to a folder (tiny
llama-family configs: `llama_config`), timed with planner.backends.timing.time_steps (the dry run's
program on real CPU tensors, no tracker) and predicted with planner.engine.timing.step_time on the
same workload. Besides the registered techniques, `FORWARD` is a no-grad forward of a model
(`model(input_ids=ids, use_cache=False)`: the engine's `forward` program).

Timing (`time_cases`): every case's repeats interleaved, round after round over all cases, each
round in its own seeded random order (round r: `random.Random(r)`), so that a burst of load on a shared
machine hits every case alike and two cases are not neighbours in every round (rotating one order
kept neighbours together: on 2026-12-07 the small rm and dpo programs, adjacent in that order, took
the same slow window in three rounds of five and measured ~22 ms a step more than in the others); a sample is the median of one time_steps call's steps (after its
warm-up steps; as many steps as make SAMPLE_S, from one step timed first, at least the case's
`steps`), a case's figure (`figure`) the mean of its samples, its spread (max - min) / median. A cheap
case (one sample under CHEAP_SAMPLE_S) is sampled CHEAP_SAMPLES times a round, at random places in
the round's order, so that its samples fall over the whole run as a long case's steps do.

Why the mean of the samples: this shared 2-core machine's speed is bimodal. 50 calls of a bf16
`F.linear` (128 x 64 x 128), repeated every 0.3 s for 20 s, took 505-560 us or 760-830 us a call, and
an fp32 one 29-38 us or 45-65 us at the same moments (2026-12-07, `/tmp`, nothing else running on the
VM: another tenant on the same physical cores); the slow mode held most of the time, switching every
few seconds. A sample shorter than a mode's window catches one mode; a step longer than it averages
them. The quietest sample (the figure of runs G and H) therefore measured a short program in the
fast mode and a long one at the mix of the two, and a profile fitted to one cannot price both: in
run H the bf16 programs of 35-200 ms came out +14% to +30% and those of 1.3-20 s -1% to +8%, the
bf16 scale having been fitted on calibration programs of 1-1.7 s. The median of the samples flips
between the modes when they are near even (run F: the tiny programs' errors moved up to 30% between
runs). The mean over samples spread through the run is the time-averaged speed that a long step
measures by itself, the same for every program and for the calibration programs the profile is
fitted to. The tables print the quietest sample and the median beside it.
"""

from __future__ import annotations

import contextlib
import random
import gc
import json
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload

Progress = Callable[[str, int, int], None]


def llama_config(layers: int, hidden: int, intermediate: int | None = None, heads: int = 4, kv_heads: int = 2,
                 vocab: int = 1000, family: str = "llama", dtype: str = "bfloat16",
                 max_positions: int = 4096) -> dict[str, Any]:  # fmt: skip
    """A tiny llama-family config.json: `family` llama (no biases) or qwen2 (q/k/v biases)."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    cfg: dict[str, Any] = {
        "architectures": [arch], "model_type": family, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate or 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
    }  # fmt: skip
    if family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    return cfg


def write_config(root: str | Path, name: str, config: dict[str, Any]) -> str:
    """`root/name/config.json`; the folder's path (what Plan(model=...) takes)."""
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return str(d)


# ---- a no-grad forward ------------------------------------------------------------------------------
def forward_workload(plan, model) -> Workload:
    return Workload(
        technique="forward",
        models=(ModelUse("model", model, plan, trainable=False, ref=plan.model),),
        phases=(Phase("forward", "forward", "model", plan.batch, plan.seq),),
    )


def forward_step(ctx) -> None:
    """`model(input_ids=ids, use_cache=False)` under no_grad: the logits of every position."""
    import torch

    model = ctx.model("model")
    ids = ctx.token_ids(ctx.plan.batch, ctx.plan.seq)
    with ctx.phase("forward"), torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    ctx.keep(out)


FORWARD = Technique(name="forward", kind="inference", description="a no-grad forward over full sequences (logits)",
                    workload=forward_workload, step=forward_step, plan_fields=("seq",))  # fmt: skip


# ---- cases ------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One program: `technique` (default: the plan's task) on `plan`; each sample a time_steps call
    of `steps` timed steps after `warmup` untimed ones."""

    label: str
    plan: Any
    technique: Technique | None = None
    steps: int = 3
    warmup: int = 1
    samples: list[float] = field(default_factory=list)
    _model: Any = field(default=None, repr=False)
    _config: Any = field(default=None, repr=False)

    @property
    def tech(self) -> Technique:
        if self.technique is not None:
            return self.technique
        from planner.plugins import technique

        return technique(self.plan.task)

    @property
    def model(self):
        if self._model is None:
            from planner.models import load_model

            self._model = load_model(self.plan.model)
        return self._model

    @property
    def config(self) -> dict:
        if self._config is None:
            from planner.models import model_config

            self._config = model_config(self.plan.model)
        return self._config

    def workload(self) -> Workload:
        return self.tech.workload(self.plan, self.model)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def quietest(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def figure(self) -> float:
        """The case's measured step time: the mean of its samples (module docstring: why not the
        quietest sample or the median)."""
        return statistics.fmean(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples."""
        m = self.median
        return (max(self.samples) - min(self.samples)) / m if self.samples and m > 0 else 0.0

    @property
    def iqr(self) -> float:
        """Interquartile range / median of the samples (0 with fewer than 4)."""
        if len(self.samples) < 4 or not self.median > 0:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return (q[2] - q[0]) / self.median


# A sample times at least SAMPLE_S of steps (at most MAX_STEPS of them): the median of 3 steps of a
# 10 ms program moved 20-30% between two runs on this shared 2-core machine (the time validation of
# 2026-12-02 against 2026-12-03: sft lora bf16 llama-2x64 12.8 vs 17.1 ms, rm bf16 13.7 vs 18.5 ms),
# a 20-step sample of the same program 10% (min/median/max of 3 x 20 steps: 15.7/16.6/21.4,
# 15.9/17.4/20.3, 14.2/18.6/21.7 ms).
SAMPLE_S = 0.15
MAX_STEPS = 25
# Cheap cases sampled more: in the time validation of 2026-12-07 (five rounds, one sample a round) slow
# windows of this shared machine hit whole rounds (the second round's samples 1.2-1.9x the fastest for
# most small programs), and the median of five took them in: the tiny programs' spreads reached 45-87%
# and their errors +-30%, noise rather than model. Three samples a round, spread over the round, cost the
# small programs (~0.2 s a sample) about a minute over a half-hour validation.
CHEAP_SAMPLE_S = 1.0
CHEAP_SAMPLES = 3


def steps_per_sample(step_s: float, least: int) -> int:
    """Steps of one sample: enough for SAMPLE_S at `step_s` a step, at least `least`, at most MAX_STEPS."""
    import math

    if not step_s > 0:
        return least
    return max(least, min(MAX_STEPS, math.ceil(SAMPLE_S / step_s)))


def time_cases(cases: Sequence[Case], rounds: int, threads: int | None = 1, progress: Progress | None = None,
               stage: str = "steps") -> list[Case]:  # fmt: skip
    """`rounds` samples of every case, interleaved (module doc); appended to each case's `samples`."""
    from planner.backends.timing import time_steps

    cases = list(cases)
    total, done = rounds * len(cases), 0
    with frozen_heap() as refreeze:
        seen = set()
        for c in cases:  # one untimed step of each kind of program: its imports happen here
            kind = (c.tech.name, c.plan.task, c.plan.method, c.plan.grad_ckpt)
            if kind not in seen:
                seen.add(kind)
                time_steps(c.tech, c.plan, c.config, steps=1, warmup=0, threads=threads)
                refreeze()
        per_round = {}
        for c in cases:  # one step of each, timed after a warm-up: how many steps make a sample
            once = min(time_steps(c.tech, c.plan, c.config, steps=1, warmup=1, threads=threads))
            c.steps = steps_per_sample(once, c.steps)
            per_round[id(c)] = CHEAP_SAMPLES if once * (c.steps + c.warmup) < CHEAP_SAMPLE_S else 1
            refreeze()
        total = rounds * sum(per_round.values())
        for r in range(rounds):
            order = [c for c in cases for _ in range(per_round[id(c)])]
            random.Random(r).shuffle(order)
            for c in order:
                times = time_steps(c.tech, c.plan, c.config, steps=c.steps, warmup=c.warmup, threads=threads)
                c.samples.append(statistics.median(times))
                refreeze()
                done += 1
                if progress is not None:
                    progress(stage, done, total)
    return cases


@contextlib.contextmanager
def frozen_heap() -> Iterator[Callable[[], None]]:
    """time_steps collects garbage before every step (outside the timed region); with transformers,
    peft and torch imported a full collection walks every live object (0.2 s a step here) and
    leaves the caches cold for the step timed next. `gc.freeze()` moves the objects alive now out
    of the collector's reach for the duration (what the steps leave behind is still collected); the
    function yielded collects and freezes again (after a program's imports)."""

    def refreeze() -> None:
        gc.collect()
        gc.freeze()

    refreeze()
    try:
        yield refreeze
    finally:
        gc.unfreeze()


def phase_times(case: Case, steps: int = 5, warmup: int = 2, threads: int | None = 1) -> dict[str, float]:
    """Median seconds per tracker phase of the case's steps (setup, forward, loss, backward,
    optimizer; prefill, decode...): a diagnostic beside time_steps' whole-step figure. The step's
    phase holder is made to note the time at every change of phase (the same program otherwise)."""
    import time

    import torch

    from planner.backends.timing import run_step, time_steps, timed_program

    class _Stamped:
        stamps: list

        @property
        def phase(self) -> str:
            return self.__dict__["phase"]

        @phase.setter
        def phase(self, name: str) -> None:
            self.__dict__.setdefault("stamps", []).append((time.perf_counter(), self.__dict__.get("phase", "setup")))
            self.__dict__["phase"] = name

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    per: dict[str, list[float]] = {}
    try:
        with frozen_heap() as refreeze:
            time_steps(case.tech, case.plan, case.config, steps=1, warmup=0, threads=threads)  # its imports
            refreeze()
        with frozen_heap(), timed_program(case.tech, case.plan, case.config) as ctx:
            holder = ctx.tracker
            holder.__class__ = type("Stamped" + type(holder).__name__, (_Stamped, type(holder)), {})
            for i in range(warmup + steps):
                gc.collect()
                holder.__dict__["stamps"] = []
                t0 = time.perf_counter()
                run_step(case.tech, ctx, i)
                holder.stamps.append((time.perf_counter(), holder.phase))
                if i < warmup:
                    continue
                acc: dict[str, float] = {}
                prev = t0
                for t, name in holder.stamps:
                    acc[name] = acc.get(name, 0.0) + t - prev
                    prev = t
                for name, v in acc.items():
                    per.setdefault(name, []).append(v)
    finally:
        torch.set_num_threads(before)
    return {name: statistics.median(v) for name, v in per.items()}


def predicted_parts(case: Case, profile) -> dict[str, tuple[float, float]]:
    """(host, device) seconds of every part of the engine's program ('phase/part' as
    `engine_counts`), priced as planner.engine.timing prices them (decode: all its steps)."""
    from planner.engine.cost import price
    from planner.engine.timing import _program

    wl = case.workload()
    out: dict[str, tuple[float, float]] = {}
    for ph in wl.phases:
        prog = _program(ph, wl)
        steps = max(ph.new_tokens - 1, 0)
        for part, stretches in prog.phases.items():
            decode = part == "decode"
            if decode and steps == 0:
                continue
            tokens, seq = (ph.batch, ph.seq + ph.new_tokens / 2) if decode else (ph.batch * ph.seq, ph.seq)
            h = d = 0.0
            for s in stretches:
                c = price(s.ops, ph.batch if s.per_sequence else tokens, seq, profile, s.mode)
                n = s.repeat * ((steps - s.fewer) / steps if decode and s.fewer else 1) * (steps if decode else 1)
                h += c.host_s * n
                d += c.device_s * n
            out[f"{ph.name}/{part}"] = (h, d)
    return out


def predict(case: Case, profile) -> Any:
    """planner.engine.timing.step_time of the case's workload priced by `profile`."""
    from planner.engine.timing import step_time

    return step_time(case.workload(), profile)


# ---- the op lists: the engine's against what the real program dispatches -----------------------------
def engine_counts(case: Case) -> dict[str, dict[str, int]]:
    """Ops per kind of every part of the engine's program (decode expanded over its steps), keyed
    'phase/part' ('train/forward', 'generate/decode'), plus the module calls ('modules')."""
    from planner.engine.timing import _program

    wl = case.workload()
    out: dict[str, dict[str, int]] = {}
    for ph in wl.phases:
        prog = _program(ph, wl)
        steps = max(ph.new_tokens - 1, 0)
        for part in prog.phases:
            ops = prog.ops(part, steps if part == "decode" else 1)
            counts = {k: v for k, v in ops.counts().items() if v}
            counts["modules"] = ops.modules
            out[f"{ph.name}/{part}"] = counts
    return out


def recorded_counts(case: Case) -> dict[str, dict[str, int]]:
    """Ops per kind of each phase of the real program's steady step, as an OpRecorder sees it
    (planner.backends.timing.record_steps)."""
    from planner.backends.timing import record_steps

    summary = record_steps(case.tech, case.plan, case.config, steps=2).summary()
    out = {}
    for name, ph in summary.phases.items():
        counts = {k: t.count for k, t in ph.kinds.items()}
        ids = sum(n for op, n in ph.ops.items() if op.startswith("aten.randint"))  # ctx.token_ids
        if ids:
            counts["elementwise"] -= ids
        out[name] = {k: v for k, v in counts.items() if v}
    return out


KERNEL_KINDS = ("matmul", "attention", "elementwise", "foreach", "sync", "host")


def op_list_check(case: Case) -> tuple[bool, str]:
    """(the engine's op counts per kind over the step equal the recorder's, a one-line difference).
    The step's random token ids (randint, in the recorder's setup phase) are left out: no engine
    program has them."""
    eng: dict[str, int] = {}
    for counts in engine_counts(case).values():
        for k, v in counts.items():
            if k != "modules":
                eng[k] = eng.get(k, 0) + v
    rec: dict[str, int] = {}
    for counts in recorded_counts(case).values():
        for k, v in counts.items():
            rec[k] = rec.get(k, 0) + v
    diffs = [f"{k} {eng.get(k, 0)} vs {rec.get(k, 0)}" for k in (*KERNEL_KINDS, "view", "other")
             if eng.get(k, 0) != rec.get(k, 0)]  # fmt: skip
    return not diffs, ("engine vs recorded: " + ", ".join(diffs)) if diffs else "same op counts per kind"
