"""What a dry run reports. Plain pydantic: importing this module does not import torch."""

from __future__ import annotations

from pydantic import BaseModel, Field

# Phases of the replayed programs.
PHASES: tuple[str, ...] = ("forward", "loss", "backward", "optimizer", "prefill", "decode")


class DryRunResult(BaseModel):
    """Memory of one replayed program (see planner/backends/dryrun/__init__.py for the programs).

    peak_allocated_bytes: most bytes live at once, counted from after the model, adapters and
      optimizer were built (their bytes included, as they stay allocated) through all steps,
      each storage rounded up to the CUDA caching allocator's 512-byte granularity.
    breakdown: bytes per category at the moment of that peak (planner.result.CATEGORIES); sums to
      peak_allocated_bytes.
    details: finer items at the peak (subsets of the categories, not additive with them) and
      memory outside the allocator (paged optimizer states), see `DETAIL_DOCS`.
    peak_phase: phase of the step in which the peak happened; peak_step: 0-based step index.
    peak_op: the aten op whose output made the peak (to add a kernel's workspace analytically).
    phases: peak bytes seen within each phase.
    peak_by_origin: bytes at the peak by '<category> <module>:<aten op>' that allocated them
      (layer indices folded into `layers.*`; `[bw]`: made in backward, `[recompute]`: made while
      recomputing a checkpointed layer), the 60 largest and '(rest)'.
    step_end_bytes: live bytes after each step (flat from step 2 on if nothing leaks).
    """

    peak_allocated_bytes: int
    breakdown: dict[str, int]
    details: dict[str, int] = Field(default_factory=dict)
    peak_phase: str
    peak_step: int = 0
    peak_op: str = ""
    phases: dict[str, int] = Field(default_factory=dict)
    peak_by_origin: dict[str, int] = Field(default_factory=dict)
    step_end_bytes: list[int] = Field(default_factory=list)
    baseline_bytes: int = 0
    params: dict[str, int] = Field(default_factory=dict)
    wall_s: float
    device: str = "fake"
    versions: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    # planner.engine.allocator's events, when the run was asked to record them (not serialised)
    allocation_trace: list[tuple] | None = Field(None, exclude=True, repr=False)


DETAIL_DOCS: dict[str, str] = {
    "quant_state": "bitsandbytes 4-bit quantization states (absmax, codes, nested state); in 'other'",
    "kv_cache": "DynamicCache keys+values (also the 'kv_cache' category)",
    "logits": "live 16-bit tensors of batch x seq x vocab (lm_head output, its gradient)",
    "logits_fp32": "live fp32 tensors of batch x seq x vocab (upcast logits, log-softmax output, their gradients)",
    "weight_casts": "low-precision copies of fp32 parameters made by autocast (cached for the forward) or casts",
    "dequantized_weights": "bf16 weights dequantized from 4 bits (forward fallback path, backward)",
    "optimizer_temporaries": "tensors allocated inside optimizer.step that are not optimizer states",
    "host_step_counters": "torch.tensor() made inside optimizer.step (foreach AdamW's per-parameter step counters and its "
    "wrapped 1.0): host memory in a CUDA run, excluded from the peak",
    "paged_optimizer_states": "PagedAdamW8bit states in CUDA unified memory: outside the allocator, not in the peak",
}
