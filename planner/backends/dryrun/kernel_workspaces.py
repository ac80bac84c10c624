"""Device memory CUDA kernels take from the caching allocator inside an op and give back before it
returns: invisible to a fake-tensor run (the op's outputs are all it sees), but blocks the real
allocator must find, so they shape its cache. Read from the torch 2.11 sources (a helper's
reading of aten/src/ATen/native/transformers/cuda, EmbeddingBackwardKernel.cu, against the
2.11 cu130 wheel); each entry names its source. The allocation trace adds them right after the
op's outputs, freed at once. The sizes are computed by planner.engine.runtime (the engine's own trace
uses the same formulas).

- SDPA backward, cuDNN attention (what torch 2.11 picks on sm90/sm100 with cuDNN > 9.15.1:
  `check_prefer_cudnn_attention` in sdp_utils.cpp): one workspace of
  `mha_graph.get_workspace_size()`; its visible part is the fp32 dQ accumulator (B x H x S x D x 4
  bytes) and the softmax sums (B x H x S x 4). The rest of cuDNN's plan workspace is not
  published: this is a lower bound.
- SDPA backward, flash attention (other cards): `mha_bwd` allocates dq_accum (B x round128(S) x H
  x round32(D) fp32), softmax_d (B x H x round128(S) fp32, dropped by its caller) and, with fewer
  KV heads than query heads, dk_expanded and dv_expanded (B x S x H x D in the input dtype).
- embedding_dense_backward with more than 3072 indices: `grad_weight_per_segment`, P x D fp32 with
  P = N // 10 + min(N, V) (NROWS_PER_THREAD = 10); the index arrays beside it are a few bytes per
  index and left out.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from planner.engine.runtime import embedding_backward_workspace, sdpa_backend_for, sdpa_backward_workspaces

__all__ = ["kernel_workspaces", "kernel_workspaces_for", "sdpa_backend_for"]


def _sdpa_backward(backend: str) -> Callable[[tuple], list[int]]:
    def sizes(args: tuple) -> list[int]:
        q, k = args[1], args[2]  # (grad_out, query, key, value, out, logsumexp, ...)
        if not (isinstance(q, torch.Tensor) and q.dim() == 4 and isinstance(k, torch.Tensor)):
            return []
        b, h, s, d = (int(x) for x in q.shape)
        return sdpa_backward_workspaces(backend, b, h, int(k.shape[1]), s, d, q.element_size())

    return sizes


def _embedding_backward(args: tuple) -> list[int]:
    grad, indices, num_weights = args[0], args[1], int(args[2])
    scale_by_freq = bool(args[4]) if len(args) > 4 else False
    size = embedding_backward_workspace(int(indices.numel()), num_weights, int(grad.shape[-1]), scale_by_freq)
    return [size] if size else []


def kernel_workspaces(sdpa_backend: str = "cudnn") -> Callable[[Any, tuple], list[int]]:
    """fn(func, args) -> bytes of each internal allocation of that op (empty: none)."""
    table = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _sdpa_backward(sdpa_backend),
        torch.ops.aten.embedding_dense_backward.default: _embedding_backward,
    }

    def of(func, args: tuple) -> list[int]:
        fn = table.get(func)
        return fn(args) if fn is not None else []

    return of


def kernel_workspaces_for(trace: dict) -> Callable[[Any, tuple], list[int]] | None:
    """Trace options' `sdpa_backend` ("cudnn" or "flash"): its table; None when not given."""
    backend = trace.get("sdpa_backend")
    return kernel_workspaces(backend) if backend is not None else None
