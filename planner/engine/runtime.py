"""What the allocator and the CUDA runtime add beyond the bytes a program's tensors hold.

- cuBLAS workspace: torch allocates one per (cuBLAS handle, stream) through the caching allocator
  (aten/src/ATen/cuda/CublasHandlePool.cpp, `getNewWorkspace`), so it counts in
  `max_memory_allocated` once the first matmul ran; cuBLASLt shares it by default. Its default
  size (`CUBLAS_WORKSPACE_CONFIG` unset) is 4096 KiB x 8 = 32 MiB on sm90 (H100/H200) and
  4096 KiB x 2 + 16 KiB x 8 = 8.125 MiB on other cards (the 8,519,680 bytes left allocated after
  one Linear on an A10G in pytorch/pytorch#95668). Handles are per thread, and autograd runs CUDA
  backward on its own device thread: a training step holds two workspaces, generation one.
  Unknown cards (custom, no compute capability) get the larger size.
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


def cublas_workspace_bytes(compute_capability: str | None, threads: int) -> int:
    """Workspaces a step holds: one per thread issuing matmuls (forward, autograd's device thread)."""
    size = OTHER_CUBLAS_WORKSPACE if compute_capability not in (None, "9.0") else HOPPER_CUBLAS_WORKSPACE
    return size * threads


def reserved_bytes(peak_allocated: int, live_tensor_classes: int) -> int:
    """Reserved at the peak: allocated rounded to segments plus cached slack."""
    rounded = -(-peak_allocated // SEGMENT_ROUND) * SEGMENT_ROUND
    return rounded + live_tensor_classes * SEGMENT_ROUND + LARGE_BUFFER
