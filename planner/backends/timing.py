"""Real CPU step times: a technique's `step(ctx)` on real CPU tensors, without the tracker.

The program is the dry run's (planner.backends.tracked): models built the same way (on meta, then
real tensors with small random values), the same optimizers (AdamW foreach, as CUDA's default),
and the patches that decide which ops run: SDPA without a mask (transformers_not_tracing),
`torch.is_autocast_enabled()` answered for the CPU, CUDA's autocast op lists, bitsandbytes' CUDA
gemm_4bit dispatch, TRL's kernels' emulation (`ctx.device_kernels`). Left out: the DryRunTracker
and every dispatch mode (each slows every op) and the tracker-only patches (KV-cache attribution).
A generation runs its whole decode (every forward runs the model; one step = one generate call).

`tests/test_op_recorder.py` checks that this is the same program: the ops recorded here (with
only an OpRecorder active) equal those recorded under the tracker.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Iterator


class _Phases:
    """What TrackedContext asks of its tracker, without tracking: the current phase and step."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.step = 0


@contextlib.contextmanager
def timed_program(technique, plan, config: dict) -> Iterator[Any]:
    """The step context of `technique` on real CPU tensors with the dry run's program-shaping
    patches active and nothing tracking it: yields a planner.backends.tracked.TrackedContext
    whose `tracker` is a plain phase holder (`ctx.tracker.phase`: the phase the step is in,
    'setup' before the step marks its first)."""
    from planner.backends.dryrun import _patches
    from planner.backends.dryrun._build import build_meta, materialize
    from planner.backends.dryrun._programs import make_optimizer
    from planner.backends.tracked import TrackedContext, _loss_phase_hooks
    from planner.models import load_model, model_config

    workload = technique.workload(plan, load_model(plan.model))
    configs = {use.role: (config if use.source == plan.model else model_config(use.source)) for use in workload.models}
    generates = any(ph.kind == "generate" for ph in workload.phases)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patches.transformers_not_tracing(answer_reads=not generates))
        stack.enter_context(_patches.autocast_query_means_cpu())
        stack.enter_context(_patches.cuda_autocast_policy())
        models: dict[str, Any] = {}
        opts: dict[str, Any] = {}
        for use in workload.models:
            meta, _ = build_meta(use.setup, configs[use.role], train=use.trainable, head=use.spec.head)
            models[use.role] = materialize(meta, None).model
            if use.trainable:
                trainable = [p for p in models[use.role].parameters() if p.requires_grad]
                opts[use.role], _ = make_optimizer(use.setup, trainable, None)
        if any(use.setup.method == "qlora" for use in workload.models):
            stack.enter_context(_patches.bnb_cuda_gemm(tracker=None))
        phases = _Phases()
        ctx = TrackedContext(plan, workload, models, opts, phases, "cpu", configs)
        ctx.full_decode = True
        hooks = _loss_phase_hooks(models, phases)  # phase names only ('loss'): Python hooks, no ops
        try:
            yield ctx
        finally:
            for h in hooks:
                h.remove()
            ctx.release()


def run_step(technique, ctx, index: int) -> float:
    """Run step `index` of `technique` in a `timed_program` context; its wall time in seconds."""
    ctx.step_index = index
    ctx.tracker.step = index
    ctx.tracker.phase = "setup"
    t0 = time.perf_counter()
    technique.step(ctx)
    return time.perf_counter() - t0


def time_steps(technique, plan, config: dict, steps: int, warmup: int, *, threads: int | None = 1) -> list[float]:
    """Wall times (time.perf_counter around `technique.step(ctx)`) of `steps` steps run after
    `warmup` untimed ones, on real CPU tensors, the dry run's program without the tracker.

    threads: torch's intra-op threads for the run (restored after; None: as they are). Default 1:
    the models that run for real here are tiny, and on a shared 2-core machine a second OpenMP
    thread contending with other processes made a tiny LoRA step 100x slower (0.01 -> 1.5 s).
    Between steps the garbage collector runs (outside the timed region). Take medians over
    interleaved repeats: shared machines spread (shared/notes/timing.md)."""
    import torch

    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with timed_program(technique, plan, config) as ctx:
            times = []
            for i in range(warmup + steps):
                gc.collect()
                dt = run_step(technique, ctx, i)
                if i >= warmup:
                    times.append(dt)
            return times
    finally:
        torch.set_num_threads(before)


def record_steps(technique, plan, config: dict, steps: int = 2):
    """The aten ops of `steps` steps of the timed program (no tracker: only an OpRecorder active),
    every step recorded (planner.backends.dryrun.ops.OpRecorder; `.summary()` gives the last)."""
    from planner.backends.dryrun.ops import OpRecorder, host_step_counters

    with timed_program(technique, plan, config) as ctx:
        rec = OpRecorder(phase=lambda: str(ctx.tracker.phase), host_tensors=host_step_counters(ctx._opts.values()))
        with rec:
            for i in range(steps):
                rec.step = i
                run_step(technique, ctx, i)
    return rec
