"""What a backend reports. Plain pydantic: importing it does not import torch."""

from __future__ import annotations

import platform

from pydantic import BaseModel, Field

from planner.engine.allocator import AllocatorAnswer


# The kinds of aten ops an OpRecorder tells apart; the rules are planner.backends.dryrun.ops.op_kind's
# ("host": an op on tensors the CUDA program keeps on the host, e.g. AdamW's step counters).
OP_KINDS = ("matmul", "attention", "elementwise", "foreach", "view", "sync", "host", "other")


class OpTotals(BaseModel):
    """Ops of one kind: how many, their FLOPs, and the bytes they read and write (see
    planner.backends.dryrun.ops: views and bookkeeping ops read and write 0)."""

    count: int = 0
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class PhaseOps(BaseModel):
    """The ops of one phase: totals per kind (in OP_KINDS order) and the aten overloads with their
    counts ('aten.mm.default': 14), most frequent first."""

    kinds: dict[str, OpTotals] = Field(default_factory=dict)
    ops: dict[str, int] = Field(default_factory=dict)


class OpSummary(BaseModel):
    """The aten ops one step dispatched, recorded by planner.backends.dryrun.ops.OpRecorder.

    step: the step summarised, the last one run (the steady state: optimizer states exist);
    steps: every step recorded; per_step: each of them as totals per kind (compare the first
    step with the steady one). phases: per phase of the summarised step (setup/forward/loss/
    backward/optimizer as the tracker names them, the step's own phase names otherwise, a
    generation's prefill/decode), in the order first entered; total: the whole step.
    """

    step: int = 0
    steps: list[int] = Field(default_factory=list)
    phases: dict[str, PhaseOps] = Field(default_factory=dict)
    total: PhaseOps = Field(default_factory=PhaseOps)
    per_step: list[dict[str, OpTotals]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class Measurement(BaseModel):
    """One measured run of a plan.

    peak_allocated_bytes: most bytes live in the allocator (MemTracker's peak, or
      torch.cuda.max_memory_allocated counted from after the model and optimizer were built, their
      bytes included). reserved_bytes: torch.cuda.max_memory_reserved (None off CUDA).
    breakdown: bytes per category at the peak (None where the device gives only totals).
    step_time_s / tokens_per_s: median over the steps after the first (None for the dry run).
    oom: the run ran out of memory; oom_phase says where.
    ops: the aten ops of the last step (run_backend(..., record_ops=True)), else None.
    """

    backend: str
    device: str
    peak_allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    cuda_context_bytes: int | None = None
    breakdown: dict[str, int] | None = None
    details: dict[str, int] = Field(default_factory=dict)
    peak_phase: str | None = None
    peak_op: str | None = None  # the op whose allocation reached the peak (tracked backends)
    phases: dict[str, int] = Field(default_factory=dict)
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    oom: bool = False
    oom_phase: str | None = None
    wall_s: float = 0.0
    device_name: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    ops: OpSummary | None = None
    # simulated caching allocator (planner.engine.allocator) over the run's allocation trace
    allocator: AllocatorAnswer | None = None
    # the allocation trace itself, when recorded (not serialised: tens of thousands of events)
    allocation_trace: list[tuple] | None = Field(None, exclude=True, repr=False)


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The versions of python and of the libraries a measurement ran with (read, never required);
    `extra`: more distributions, read from their metadata (never imported)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing backend library is reported, not fatal
            out[name] = "not installed"
    # TRL runs only inside the dpo steps with --logprobs selective/fused: its version without importing it
    from importlib import metadata

    for name in ("trl", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
