"""Result models shared by the engine, the CLI and the backends. All sizes are bytes."""

from __future__ import annotations

from pydantic import BaseModel, Field

# MemTracker's categories (torch.distributed._tools.mem_tracker._MemRefType), plus the KV cache.
CATEGORIES: tuple[str, ...] = (
    "parameters",
    "buffers",
    "gradients",
    "activations",
    "optimizer_states",
    "temporaries",
    "other",
    "kv_cache",
)


class MemoryEstimate(BaseModel):
    """Per-GPU memory of one step.

    peak_allocated_bytes: most bytes live in the allocator (torch.cuda.max_memory_allocated).
    reserved_bytes: plus the caching allocator's rounding/fragmentation (max_memory_reserved; fit puts
      the simulated allocator's figure here where the engine traces the plan).
    device_bytes: plus CUDA context and library workspaces: what must fit the card.
    breakdown: live bytes per category at the moment of the peak; sums to peak_allocated_bytes.
    details: finer items at the peak (logits, quantization states, adapter weights...).
    device_items: what device_bytes adds beyond the allocator (cuda_context, allocator_overhead...).
    outside_allocator: memory the step uses that the allocator does not count (paged optimizer
      states in unified memory); reported apart, not in any of the three figures.
    phases: peak allocated within each phase of the step.
    """

    peak_allocated_bytes: int
    reserved_bytes: int
    device_bytes: int
    peak_phase: str
    breakdown: dict[str, int]
    details: dict[str, int] = Field(default_factory=dict)
    device_items: dict[str, int] = Field(default_factory=dict)
    outside_allocator: dict[str, int] = Field(default_factory=dict)
    phases: dict[str, int] = Field(default_factory=dict)
