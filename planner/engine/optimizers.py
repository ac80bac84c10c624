"""Optimizer state and the transient memory of `optimizer.step()`.

- adamw (torch, foreach: CUDA's default): exp_avg and exp_avg_sq in the parameter's dtype; `step`
  counters stay on the CPU. `_multi_tensor_adamw` computes `exp_avg_sq_sqrt = _foreach_sqrt(...)`
  for the whole dtype group at once: one parameter-sized temporary during the step.
- adamw-fused: the same states, no temporary (one kernel); `step` counters live on the GPU (one
  fp32 scalar per tensor, a 512-byte allocator block each).
- sgd (torch defaults: no momentum): no state, no temporary (`_foreach_add_` in place).
- adamw-8bit (bitsandbytes AdamW8bit): tensors with >= 4096 elements get uint8 state1/state2 and
  fp32 absmax per 256-block; smaller tensors fp32 states. qmaps: two 256-entry fp32 tables.
- paged-adamw-8bit: the same, but state buffers of tensors with >= 1e5 elements are allocated in
  CUDA unified memory (`get_paged`), outside the caching allocator: reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from planner.engine.resident import Resident
from planner.engine.tape import DTYPE_BYTES

MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer8bit min_8bit_size default
PAGED_MIN_NUMEL = 100_000  # bitsandbytes get_state_buffer: paged only when p.numel() >= 1e5
BNB_BLOCK = 256
CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to 512 bytes


@dataclass(frozen=True)
class OptimizerModel:
    """An optimizer a plugin adds (`register_optimizers`): bytes of state and of `step()`'s
    transients per trainable element of a given dtype, and how a backend builds it."""

    name: str
    state_bytes_per_element: "Callable[[str], float]"
    step_temp_bytes_per_element: "Callable[[str], float]"
    build: "Callable[[list[Any]], Any] | None" = None
    description: str = ""


@dataclass(frozen=True)
class OptimizerMemory:
    state_bytes: int  # in the allocator
    step_temp_bytes: int  # extra live during step()
    paged_bytes: int = 0  # unified memory, outside the allocator


def _bnb8_bytes(n: int) -> tuple[int, bool]:
    """State bytes of one tensor under AdamW8bit, and whether it would be paged."""
    if n < MIN_8BIT_SIZE:
        return 2 * 4 * n, False
    blocks = -(-n // BNB_BLOCK)
    return 2 * n + 2 * 4 * blocks, True


def optimizer_memory(name: str, res: Resident, num_layers: int) -> OptimizerMemory:
    nbytes = DTYPE_BYTES[res.trainable_dtype]
    n = res.trainable_elems
    if name == "sgd":
        return OptimizerMemory(0, 0)
    if name == "adamw":
        return OptimizerMemory(2 * n * nbytes, n * nbytes)
    if name == "adamw-fused":
        return OptimizerMemory(2 * n * nbytes + res.trainable_tensors * CUDA_BLOCK, 0)
    if name in ("adamw-8bit", "paged-adamw-8bit"):
        paged = name == "paged-adamw-8bit"
        inside = outside = 0
        sizes = [(s, num_layers) for s in res.trainable_sizes] + [(s, 1) for s in res.other_trainable_sizes]
        for size, count in sizes:
            b, eight_bit = _bnb8_bytes(size)
            if paged and size >= PAGED_MIN_NUMEL:
                # state1/state2 paged; the fp32 absmax stays in the allocator
                absmax = 2 * 4 * (-(-size // BNB_BLOCK)) if eight_bit else 0
                outside += (b - absmax) * count
                inside += absmax * count
            else:
                inside += b * count
        qmaps = 2 * 256 * 4
        return OptimizerMemory(inside + qmaps, 0, outside)
    from planner.plugins import registry

    model = registry().optimizers.get(name)
    if model is None:
        raise ValueError(f"optimizer: unknown optimizer '{name}'")
    dt = res.trainable_dtype
    return OptimizerMemory(int(model.state_bytes_per_element(dt) * n), int(model.step_temp_bytes_per_element(dt) * n))
