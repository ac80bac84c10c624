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


# ---- device memory kernels take from the caching allocator inside one op ------------------------
# (allocated and freed before the op returns: invisible to a fake-tensor run, but blocks the real
# allocator must find; planner.backends.dryrun.kernel_workspaces puts them in the dry run's trace)
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def sdpa_backend_for(compute_capability: str | None) -> str:
    """cuDNN attention on sm90/sm100 (torch 2.11 with its pinned cuDNN 9.19), flash elsewhere."""
    if compute_capability and compute_capability.split(".")[0] in ("9", "10"):
        return "cudnn"
    return "flash"


def sdpa_backward_workspaces(backend: str, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int,
                             elem_bytes: int) -> list[int]:
    """The blocks SDPA's backward allocates inside the op (torch 2.11 sources, sdp_utils.cpp and the
    flash/cuDNN backward kernels):
    - cuDNN attention (sm90/sm100): one workspace of `mha_graph.get_workspace_size()`, whose visible part
      is the fp32 dQ accumulator (B x H x S x D x 4) plus the softmax sums (B x H x S x 4): a lower bound;
    - flash attention (other cards): dq_accum (B x round128(S) x H x round32(D) fp32), softmax_d
      (B x H x round128(S) fp32) and, with fewer KV heads than query heads, dk_expanded and dv_expanded
      (B x S x H x D in the input dtype)."""
    b, h, s, d = batch, heads, seq, head_dim
    if backend == "cudnn":
        return [b * h * s * d * 4 + b * h * s * 4]
    out = [b * _round_up(s, 128) * h * _round_up(d, 32) * 4, b * h * _round_up(s, 128) * 4]
    if kv_heads != h:
        out += [b * s * h * d * elem_bytes] * 2
    return out


# embedding_dense_backward (EmbeddingBackwardKernel.cu) sorts the indices and sums per segment above this many
EMBEDDING_SEGMENT_MIN_INDICES = 3072


def embedding_backward_workspace(indices: int, num_weights: int, dim: int, scale_by_freq: bool = False) -> int:
    """`grad_weight_per_segment` of a long embedding_dense_backward: P x D fp32 with P = N // 10 +
    min(N, V) (NROWS_PER_THREAD = 10); the index arrays beside it are a few bytes per index and left
    out. 0 when the kernel takes its short path (N <= 3072 without scale_grad_by_freq)."""
    if indices <= EMBEDDING_SEGMENT_MIN_INDICES and not scale_by_freq:
        return 0
    return (indices // 10 + min(indices, num_weights)) * dim * 4
