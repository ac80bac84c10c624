"""Dry runs: the real training / generation programs replayed at full scale on fake tensors.

`dry_run(plan, config)` builds the plan's model from a raw Hugging Face config dict with
transformers (+ peft, bitsandbytes), and runs the programs of shared/notes/heldout-protocol.md on
FakeTensorMode tensors on the CPU under a MemTracker, so that the peak it reports is what
`torch.cuda.max_memory_allocated` reports for the same program on a GPU (within what the notes
list as invisible: allocator block rounding beyond 512 B, cuBLAS/flash-attention workspaces).
`device="cpu"` runs the same code on real (small) tensors, to check that fake and real agree.

torch, transformers, peft and bitsandbytes are imported only when `dry_run` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .result import DETAIL_DOCS, PHASES, DryRunResult

if TYPE_CHECKING:
    from planner.specs import Plan

__all__ = ["dry_run", "DryRunResult", "DETAIL_DOCS", "PHASES"]


def dry_run(
    plan: "Plan", config: dict, steps: int = 3, device: str = "fake", *, round_bytes: int = 512
) -> DryRunResult:
    """Replay `plan` on the model described by `config` (a config.json dict) and measure it.

    device="fake": full scale on fake tensors (shapes only, ~no real memory);
    device="cpu": real tensors on the CPU (tiny configs only) - same program, same accounting.
    steps: training steps (sft); generation always runs one `generate` call.
    round_bytes: allocation granularity (CUDA's caching allocator: 512); 1 counts exact bytes.
    """
    from ._run import dry_run_impl

    return dry_run_impl(plan, config, steps=steps, device=device, round_bytes=round_bytes)
