"""dry_run implementation (imports torch; loaded lazily by planner.backends.dryrun.dry_run)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from . import _patches
from ._build import DTYPES, build_meta, materialize
from ._programs import make_optimizer, optimizer_state_tensors, record_generation_reads, run_generate, run_sft
from ._tracker import DryRunTracker, _MemRefType
from .result import DryRunResult


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    return out


def _classifier(vocab: int):
    dequant_ops = ("bitsandbytes.dequantize_4bit", "bitsandbytes.dequantize_blockwise")

    def classify(func, args, t: torch.Tensor) -> str | None:
        if t.dim() >= 2 and t.shape[-1] == vocab and t.is_floating_point():
            return "logits_fp32" if t.dtype == torch.float32 else "logits"
        if func is torch.ops.aten._to_copy.default and args and isinstance(args[0], nn.Parameter):
            return "weight_casts"
        name = str(func)
        if name.startswith(dequant_ops):
            return "dequantized_weights"
        return None

    return classify


def _storage_bytes(tracker: DryRunTracker, tensors) -> int:
    from torch.distributed._tools.common_utils import get_untyped_storages

    seen = set()
    total = 0
    for t in tensors:
        for st in get_untyped_storages(t):
            if id(st) in seen:
                continue
            seen.add(id(st))
            winfo, _ = tracker._WINFO.get(st, (None, None))
            if winfo is not None and not getattr(winfo, "excluded", False):
                total += winfo.mem_consumed
    return total


def dry_run_impl(
    plan, config: dict, steps: int = 3, device: str = "fake", round_bytes: int = 512, full_decode: bool = False,
    trace: dict | None = None,
) -> DryRunResult:
    if device not in ("fake", "cpu"):
        raise ValueError("device must be 'fake' (full scale on fake tensors) or 'cpu' (real tensors)")
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # tiny real tensors: thread start-up costs more than it saves
    try:
        return _dry_run(plan, config, steps, device, round_bytes, full_decode, trace)
    finally:
        torch.set_num_threads(threads)


def _dry_run(plan, config: dict, steps: int, device: str, round_bytes: int, full_decode: bool,
             trace: dict | None = None) -> DryRunResult:
    t0 = time.perf_counter()
    from torch._subclasses.fake_tensor import FakeTensorMode

    vocab = int(config["vocab_size"])
    notes: list[str] = []
    train = plan.task == "sft"
    if plan.autocast:
        dt = DTYPES[plan.compute_dtype]

        def autocast():
            return torch.autocast("cpu", dtype=dt)
    else:
        autocast = contextlib.nullcontext
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patches.transformers_not_tracing(answer_reads=train))
        stack.enter_context(_patches.autocast_query_means_cpu())
        stack.enter_context(_patches.cuda_autocast_policy())
        tracker = DryRunTracker(round_bytes=round_bytes)
        tracker.classifier = _classifier(vocab)
        if plan.method == "qlora":
            stack.enter_context(_patches.bnb_cuda_gemm(tracker=tracker))
        model, build_notes = build_meta(plan, config)
        notes += build_notes
        oracle = None
        if not train and device == "fake":
            oracle = record_generation_reads(plan, config, autocast, full_decode)
            notes.append(f"generate(): {len(oracle.answers)} host reads answered from a narrow real run")
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if device == "fake" else None
        built = materialize(model, fake_mode)
        model = built.model
        tracker.oracle = oracle
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(tracker)
        stack.enter_context(_patches.kv_cache_attribution(tracker))

        # what exists before the measured program: model, adapters, quantization states, optimizer
        tracker.begin_trace(trace)
        tracker.track_model(model)
        if built.quant_state_tensors:
            tracker.origin_context = "(quantization states)"
            tracker.track_tensors(built.quant_state_tensors, _MemRefType.OTH, detail="quant_state")
            tracker.origin_context = None
        if trace is not None:
            tracker.trace_model_setup(model, built.quant_state_tensors)
            tracker.start_trace_program()  # what building the optimizer allocates is traced as made
        opt = None
        if train:
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt, opt_notes = make_optimizer(plan, trainable, tracker)
            notes += opt_notes

            def at_peak() -> dict[str, int]:
                if tracker.phase != "optimizer":
                    return {}
                return {"optimizer_state_bytes": _storage_bytes(tracker, optimizer_state_tensors(opt))}

            tracker.at_peak = at_peak
        baseline = tracker.total
        tracker.trace_reset()
        tracker.peak_total = 0
        tracker.phase_peaks = {}
        tracker._check_peak(None)

        if train:
            step_end = run_sft(plan, model, opt, tracker, vocab, steps, autocast)
        else:
            step_end = run_generate(plan, model, tracker, vocab, autocast, full_decode)

    if oracle is not None and oracle.pos != len(oracle.answers):
        raise RuntimeError("generation replay made fewer host reads than the recorded run")
    cats, details = tracker.peak_breakdown()
    extra = tracker.peak_extra
    if "optimizer_state_bytes" in extra:
        in_opt = cats["optimizer_states"]
        cats["optimizer_states"] = extra["optimizer_state_bytes"]
        cats["temporaries"] += in_opt - extra["optimizer_state_bytes"]
        details["optimizer_temporaries"] = in_opt - extra["optimizer_state_bytes"]
    for k, v in tracker.outside.items():
        details[k] = v
    assert sum(cats.values()) == tracker.peak_total, (cats, tracker.peak_total)
    phases = {k: v for k, v in tracker.phase_peaks.items() if k not in ("setup", "between_steps")}
    return DryRunResult(
        peak_allocated_bytes=tracker.peak_total,
        breakdown=cats,
        details={k: v for k, v in details.items() if v},
        peak_phase=tracker.peak_phase,
        peak_step=max(tracker.peak_step, 0),
        peak_op=tracker.peak_op,
        phases=phases,
        peak_by_origin=tracker.peak_origin_breakdown(),
        step_end_bytes=step_end,
        baseline_bytes=baseline,
        params=built.counts,
        wall_s=round(time.perf_counter() - t0, 3),
        device=device,
        versions=_versions(),
        notes=notes,
        allocation_trace=tracker.trace,
    )
