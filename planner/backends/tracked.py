"""The `dry-run` backend (fake tensors, full scale) and the `real` backend on the CPU (real tensors,
tiny configs): a technique's `step(ctx)` under the dry-run tracker (planner.backends.dryrun).

Models are built as the programs build them (planner.backends.dryrun._build: on meta, then every tensor made
fake or real), with transformers behaving as on CUDA (planner.backends.dryrun._patches: not tracing, SDPA
with enable_gqa, CUDA's autocast policy, bitsandbytes' CUDA GEMM path). The peak counts from after
all models and optimizers exist, as on a GPU after `reset_peak_memory_stats()`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from planner.backends.context import StepContext
from planner.backends.measurement import Measurement


class TrackedContext(StepContext):
    def __init__(self, plan, workload, models: dict[str, Any], opts: dict[str, Any], tracker, device: str,
                 configs: dict[str, dict]) -> None:
        self.plan = plan
        self.workload = workload
        self._models = models
        self._opts = opts
        self.tracker = tracker
        self.device = device
        self.configs = configs
        self.current_phase = "setup"
        # run every decode forward of generate() (False: the exact-memory shortcut below)
        self.full_decode = False

    def model(self, role: str):
        return self._models[role]

    def optimizer(self, role: str):
        return self._opts[role]

    def token_ids(self, batch: int, seq: int):
        import torch

        vocab = int(next(iter(self.configs.values()))["vocab_size"])
        return torch.randint(0, vocab, (batch, seq))

    def generate(self, model, ids, new_tokens: int):
        """transformers' generate, as planner.backends.dryrun replays it: host reads of fake tensors are
        answered from a narrow real run of the same program recorded beforehand; the middle decode
        steps return logits of the right shape and the cache grows in one update before the last
        (planner.backends.dryrun._programs._generate_phases, tested exact against the full decode),
        unless `full_decode` is set: then every decode forward runs the model."""
        import torch

        from planner.backends.dryrun._programs import _generate_phases

        # a step of several phases names the generation's sub-phases as the estimate does ('rollout.prefill')
        prefix = f"{self.current_phase}." if len(self.workload.phases) > 1 and self.current_phase else ""
        try:
            with _generate_phases(model, self.tracker, new_tokens, self.full_decode, prefix), torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        finally:
            self.tracker.step = self.step_index

    @contextlib.contextmanager
    def device_kernels(self, library: str):
        """The library's CUDA kernels as a GPU run allocates around them (planner.backends.dryrun._patches);
        the library is imported with the tracker's modes off: its module-level tensors are not the
        step's."""
        from torch.utils._python_dispatch import _disable_current_modes

        from planner.backends.dryrun import _patches

        if library not in _patches.DEVICE_KERNELS:
            raise ValueError(f"library: no kernel emulation for '{library}' (known: {', '.join(_patches.DEVICE_KERNELS)})")
        cm = _patches.DEVICE_KERNELS[library]()
        with _disable_current_modes():
            cm.__enter__()
        try:
            yield
        finally:
            cm.__exit__(None, None, None)

    def _enter_phase(self, name: str) -> None:
        self.current_phase = name
        self.tracker.phase = name

    def empty_cache(self) -> None:
        self.tracker.trace_event("empty_cache")

    def _autocast(self):
        import torch

        from planner.backends.dryrun._build import DTYPES

        if self.plan.autocast:
            return torch.autocast("cpu", dtype=DTYPES[self.plan.compute_dtype])
        return contextlib.nullcontext()


class _StepOracle:
    """Host reads of a whole step, recorded on the narrow real run and answered on the fake one.

    Reads inside an optimizer step are not recorded: they are AdamW's per-parameter `step`
    counters (one per tensor, so their number depends on the model's depth), which a fake run
    answers from the counters' own constant values."""

    def __init__(self) -> None:
        from planner.backends.dryrun._programs import ScalarOracle

        self.inner = ScalarOracle()
        self.tracker = None

    @property
    def answers(self):
        return self.inner.answers

    def _in_optimizer(self) -> bool:
        return self.tracker is not None and "optimizer" in str(self.tracker.phase)

    def record(self, t, value) -> None:
        if not self._in_optimizer():
            self.inner.record(t, value)

    def answer(self, t):
        if self._in_optimizer() and getattr(t, "constant", None) is not None:
            return t.constant.item()
        return self.inner.answer(t)


def run_tracked(technique, plan, config: dict, steps: int = 3, device: str = "fake",
                narrow: bool = False, record: Any = None, record_ops: Any = False,
                full_decode: bool | None = None, trace: dict | None = None, host_reads: bool = False) -> Measurement:
    """Run `technique.step` `steps` times under the tracker; device 'fake' or 'cpu'.

    Host-side reads of fake tensors (generate()'s "all finished?", transformers' mask checks) are
    answered from a recording: the same steps run first for real on narrow copies of the models
    (same vocabulary and special tokens, tiny width: `narrow=True`, `record=<oracle>`), whose
    answers do not depend on the width.

    record_ops: True (or an OpRecorder, to keep its per-op records; it is attached to this run's
    tracker) records every aten op of every step (planner.backends.dryrun.ops) on top of the
    tracker's modes; `Measurement.ops` summarises the last step. The memory figures are the same with and without it.
    full_decode: run every decode forward of a generation (default: when recording ops, so that
    the recorded ops are the program's; the memory figures are the same either way).
    trace: record the allocation trace (`Measurement.allocation_trace`, planner.engine.allocator's
    events), with planner.backends.allocation.trace_options' options.
    host_reads: answer every host read of the fake run from the narrow real run, as for a generation
    (a user's step may read any value: `loss.item()`; planner.dryrun)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from planner.backends.dryrun import _patches
    from planner.backends.dryrun._build import build_meta, materialize
    from planner.backends.dryrun._programs import make_optimizer, optimizer_state_tensors
    from planner.backends.dryrun._run import _storage_bytes
    from planner.backends.dryrun._run import _classifier, _versions
    from planner.backends.dryrun._tracker import DryRunTracker, _MemRefType
    from planner.models import load_model, model_config

    t0 = time.perf_counter()
    from planner.backends.dryrun._programs import _RecordReads, narrow_config

    workload = technique.workload(plan, load_model(plan.model))
    configs = {use.role: (config if use.source == plan.model else model_config(use.source)) for use in workload.models}
    if narrow:
        configs = {role: narrow_config(c) for role, c in configs.items()}
    generates = any(ph.kind == "generate" for ph in workload.phases) or host_reads
    if full_decode is None:
        full_decode = bool(record_ops is not False and record_ops is not None)
    oracle = None
    if generates and device == "fake":
        oracle = _StepOracle()
        run_tracked(technique, plan, config, steps=steps, device="cpu", narrow=True, record=oracle,
                    full_decode=full_decode, host_reads=host_reads)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patches.transformers_not_tracing(answer_reads=not generates))
        stack.enter_context(_patches.autocast_query_means_cpu())
        stack.enter_context(_patches.cuda_autocast_policy())
        metas = {}
        for use in workload.models:
            metas[use.role], build_notes = build_meta(use.setup, configs[use.role], train=use.trainable,
                                                      head=use.spec.head)
            notes += build_notes
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if device == "fake" else None
        built = {role: materialize(m, fake_mode) for role, m in metas.items()}
        tracker = DryRunTracker()
        tracker.classifier = _classifier(int(config["vocab_size"]))
        tracker.oracle = oracle
        for o in (oracle, record):
            if isinstance(o, _StepOracle):
                o.tracker = tracker
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(tracker)
        tracker.begin_trace(trace)
        if any(use.setup.method == "qlora" for use in workload.models):
            stack.enter_context(_patches.bnb_cuda_gemm(tracker=tracker))
        stack.enter_context(_patches.kv_cache_attribution(tracker))
        models = {}
        opts = {}
        for use in workload.models:
            b = built[use.role]
            tracker.track_model(b.model)
            if b.quant_state_tensors:
                tracker.track_tensors(b.quant_state_tensors, _MemRefType.OTH, detail="quant_state")
            tracker.trace_model_setup(b.model, b.quant_state_tensors)
            models[use.role] = b.model
            if use.trainable:
                trainable = [p for p in b.model.parameters() if p.requires_grad]
                opts[use.role], opt_notes = make_optimizer(use.setup, trainable, tracker)
                notes += opt_notes
        ctx = TrackedContext(plan, workload, models, opts, tracker, device, configs)
        ctx.full_decode = full_decode

        def at_peak() -> dict[str, int]:
            # states created inside step() are optimizer states, not step temporaries
            if not opts or "optimizer" not in tracker.phase:
                return {}
            return {"optimizer_state_bytes": sum(_storage_bytes(tracker, optimizer_state_tensors(o)) for o in opts.values())}

        tracker.at_peak = at_peak
        hooks = _loss_phase_hooks(models, tracker)
        tracker.trace_reset()
        tracker.peak_total = 0
        tracker.phase_peaks = {}
        tracker._check_peak(None)
        if record is not None:
            stack.enter_context(_RecordReads(record))
        recorder = None
        if record_ops is not False and record_ops is not None:
            from planner.backends.dryrun.ops import OpRecorder, answered_reads, host_step_counters

            # on top of the tracker (and FakeTensorMode): it sees every op the tracker sees
            recorder = record_ops if isinstance(record_ops, OpRecorder) else OpRecorder()
            recorder.attach(tracker, host_tensors=host_step_counters(opts.values()))
            if device == "fake" and not generates:
                stack.enter_context(answered_reads(recorder))
            stack.enter_context(recorder)
        times: list[float] = []
        try:
            for i in range(steps):
                ctx.step_index = i
                tracker.step = i
                if recorder is not None:
                    recorder.step = i
                t_step = time.perf_counter()
                technique.step(ctx)
                ctx.release()  # the step's locals go when it returns
                times.append(time.perf_counter() - t_step)
                tracker.phase = "between_steps"
        finally:
            for h in hooks:
                h.remove()
            ctx.release()
    cats, details = tracker.peak_breakdown()
    extra = tracker.peak_extra
    if "optimizer_state_bytes" in extra:
        moved = extra["optimizer_state_bytes"] - cats["optimizer_states"]
        cats["optimizer_states"] += moved
        cats["temporaries"] -= moved
    for k, v in tracker.outside.items():
        details[k] = v
    phases = {k: v for k, v in tracker.phase_peaks.items() if k not in ("setup", "between_steps")}
    # wall time means something only for real tensors (CPU here: tiny models, not a GPU's speed)
    step_time = None
    if device == "cpu" and times:
        later = sorted(times[1:] or times)
        step_time = later[len(later) // 2]
    from planner.engine.timing import tokens_per_step

    tokens = tokens_per_step(workload)  # what the estimate counts: trained, else generated tokens
    ops = None
    if recorder is not None:
        op_notes = [f"aten ops of step {steps - 1} of {steps} (the last: the steady state), on "
                    + ("fake tensors" if device == "fake" else "real CPU tensors")]
        if generates and not full_decode:
            op_notes.append("generate(): decode forwards 2..n-2 did not run the model (full_decode=False)")
        ops = recorder.summary(notes=op_notes)
    return Measurement(
        backend="dry-run" if device == "fake" else "real", device=device,
        step_time_s=step_time, tokens_per_s=tokens / step_time if step_time else None,
        peak_allocated_bytes=tracker.peak_total, breakdown=cats, details={k: v for k, v in details.items() if v},
        peak_phase=tracker.peak_phase, peak_op=tracker.peak_op, phases=phases, wall_s=round(time.perf_counter() - t0, 3),
        device_name="fake tensors on the CPU" if device == "fake" else "CPU", versions=_versions(), notes=notes,
        ops=ops, allocation_trace=tracker.trace,
    )


def _loss_phase_hooks(models: dict[str, Any], tracker) -> list[Any]:
    """Mark the 'loss' phase from the output head's forward on, as planner.backends.dryrun does, and the
    'forward' phase again when another forward of the same phase starts (a pair's second half)."""
    handles = []

    def to_loss(_mod, _inp, _out):
        if tracker.phase == "forward":
            tracker.phase = "loss"

    def to_forward(_mod, _inp):
        if tracker.phase == "loss":
            tracker.phase = "forward"

    for model in models.values():
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            continue
        handles.append(head.register_forward_hook(to_loss))
        handles.append(model.register_forward_pre_hook(to_forward))
    return handles
