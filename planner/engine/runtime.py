"""What the allocator and the CUDA runtime add beyond the bytes a program's tensors hold.

- cuBLAS workspace: torch allocates one per handle/stream through the caching allocator, so it
  counts in `max_memory_allocated` once the first matmul ran. torch's default
  (`CUBLAS_WORKSPACE_CONFIG` unset) is 4096 KiB x 8 = 32 MiB on sm90 (H100/H200) and
  4096 KiB x 2 + 16 KiB x 8 = 8.125 MiB on older cards (torch/csrc/cuda/CublasHandlePool.cpp).
- CUDA context: measured on an H200 with torch 2.11/CUDA 13 as visible 139.80 GiB, free at start
  139.29 GiB (../shared/reference/measured_ceilings.csv): about 0.51 GiB; the catalog carries it per card.
- Allocator overhead (reserved - allocated): the caching allocator rounds blocks to 512 bytes and
  large segments to 2 MiB, and keeps freed blocks cached. We add one 2 MiB rounding per live
  large tensor class and the largest cached transient that cannot be reused (a "large buffer" of
  20 MiB, the allocator's kLargeBuffer, per segment class); this is a model, not a measurement:
  the GPU validation table reports how far reserved lands from it.
"""

from __future__ import annotations

MiB = 1 << 20
HOPPER_CUBLAS_WORKSPACE = 4096 * 1024 * 8
OTHER_CUBLAS_WORKSPACE = 4096 * 1024 * 2 + 16 * 1024 * 8
LARGE_BUFFER = 20 * MiB
SEGMENT_ROUND = 2 * MiB


def cublas_workspace_bytes(hopper: bool = True) -> int:
    return HOPPER_CUBLAS_WORKSPACE if hopper else OTHER_CUBLAS_WORKSPACE


def reserved_bytes(peak_allocated: int, live_tensor_classes: int) -> int:
    """Reserved at the peak: allocated rounded to segments plus cached slack."""
    rounded = -(-peak_allocated // SEGMENT_ROUND) * SEGMENT_ROUND
    return rounded + live_tensor_classes * SEGMENT_ROUND + LARGE_BUFFER
