"""What a rank holds, read from its tensors (planner run's ranks: planner.backends.launch_worker and
planner.backends.trl_run)."""

from __future__ import annotations

from typing import Any

PROGRESS = "[planner-run]"  # the launcher's output lines the parent shows as progress


def numel(t: Any) -> int:
    return int(t.numel()) if t is not None else 0


def states(state: dict) -> list:
    """An optimizer's tensor states (exp_avg, exp_avg_sq), not its scalar step."""
    import torch

    return [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]


def tensor_bytes(tensors: Any) -> int:
    """Bytes of distinct storages among `tensors` (a view and its base count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())
