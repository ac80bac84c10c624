"""What a backend reports. Plain pydantic: importing it does not import torch."""

from __future__ import annotations

import platform

from pydantic import BaseModel, Field


class Measurement(BaseModel):
    """One measured run of a plan.

    peak_allocated_bytes: most bytes live in the allocator (MemTracker's peak, or
      torch.cuda.max_memory_allocated counted from after the model and optimizer were built, their
      bytes included). reserved_bytes: torch.cuda.max_memory_reserved (None off CUDA).
    breakdown: bytes per category at the peak (None where the device gives only totals).
    step_time_s / tokens_per_s: median over the steps after the first (None for the dry run).
    oom: the run ran out of memory; oom_phase says where.
    """

    backend: str
    device: str
    peak_allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    cuda_context_bytes: int | None = None
    breakdown: dict[str, int] | None = None
    details: dict[str, int] = Field(default_factory=dict)
    peak_phase: str | None = None
    phases: dict[str, int] = Field(default_factory=dict)
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    oom: bool = False
    oom_phase: str | None = None
    wall_s: float = 0.0
    device_name: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


def versions() -> dict[str, str]:
    """The versions of python and of the libraries a measurement ran with (read, never required)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing backend library is reported, not fatal
            out[name] = "not installed"
    # TRL runs only inside the dpo steps with --logprobs selective/fused: its version without importing it
    from importlib import metadata

    try:
        out["trl"] = metadata.version("trl")
    except metadata.PackageNotFoundError:
        out["trl"] = "not installed"
    return out
