"""Reserved memory of a traced run: the run's allocation trace through the simulated caching
allocator (planner.engine.allocator), under the plan's card.

The trace comes from the dry-run tracker (planner.backends.dryrun._tracker): the set-up in the
order the real build allocates, `reset_peak_memory_stats()`, then every step's allocations and
frees in program order, and the cuBLAS workspace (CublasHandlePool.cpp allocates it through the
caching allocator when a handle first runs a matmul on a stream): one per step program, of the
card's size (planner.engine.runtime). One, not one per thread: the H200 step of
shared/reference/h200_measured_steps.csv that allocated its workspace inside the measured window
(row 1) holds 32 MiB of workspace at its peak, and its peak allocated is matched within 0.04% by
the replay with one workspace (0.7% over with two).
"""

from __future__ import annotations

from typing import Any

from planner.engine.alloc_conf import AllocatorConfig
from planner.engine.allocator import AllocatorAnswer, simulate
from planner.engine.runtime import cublas_workspace_bytes


def trace_options(plan: Any, warm_process: bool = False) -> dict:
    """What the tracker records: the workspace of the card's compute capability (sm90's 32 MiB when
    the plan names no card), the internal allocations of the SDPA backend torch picks on that card;
    warm_process: the workspace exists before the model is built."""
    from planner.backends.dryrun.kernel_workspaces import sdpa_backend_for

    cc = "9.0"
    card = _card(plan)
    if card is not None:
        cc = card.compute_capability
    return {"workspaces": {"forward": cublas_workspace_bytes(cc, 1)}, "workspaces_before_setup": warm_process,
            "sdpa_backend": sdpa_backend_for(cc)}


def _card(plan: Any):
    from planner.gpus import resolve_gpu

    if getattr(plan, "gpu", None) is None and getattr(plan, "gpu_memory", None) is None:
        return None
    return resolve_gpu(plan.gpu, plan.gpu_memory)


def allocator_capacity(plan: Any) -> int | None:
    """Bytes the caching allocator can take on the plan's card: its memory less the CUDA context
    (the workspaces are in the trace). None when the plan names no card."""
    card = _card(plan)
    if card is None:
        return None
    return card.memory_bytes - card.cuda_context_bytes


def answer(trace: list[tuple], plan: Any, config: AllocatorConfig | None = None) -> AllocatorAnswer:
    return simulate(trace, config, capacity_bytes=allocator_capacity(plan))
