"""Dry runs: the real training / generation programs replayed at full scale on fake tensors.

`dry_run(plan, config)` builds the plan's model from a raw Hugging Face config dict with
transformers (+ peft, bitsandbytes) and runs the programs of shared/notes/heldout-protocol.md on
FakeTensorMode tensors on the CPU under a MemTracker, so that the peak it reports is what
`torch.cuda.max_memory_allocated` reports for the same program on a GPU, minus what no dispatch
mode can see (allocator blocks kept whole, cuBLAS / flash-attention workspaces: see `peak_op`).
`device="cpu"` runs the same code on real (small) tensors; tests check both account identically.

Programs (planner/backends/dryrun/_programs.py):
- sft: model (+ adapters, quantization) and optimizer built first, then `steps` iterations of
  `ids = randint(B, S); out = model(input_ids=ids, labels=ids); out.loss.backward(); opt.step();
  opt.zero_grad(set_to_none=True)`, forward+loss under autocast for mixed precision and QLoRA.
- generate: `model.generate(ids, attention_mask=ones, max_new_tokens=n, min_new_tokens=n,
  do_sample=False)` on the default DynamicCache.

What makes the replay allocate what CUDA allocates (planner/backends/dryrun/_patches.py, _tracker.py):
1. AdamW foreach (CUDA's default), fused and 8-bit (states allocated as bitsandbytes does);
   AdamW's host-side step counters and paged (unified-memory) states kept out of the peak.
2. transformers does not treat fake tensors as tracing (SDPA without a mask, with enable_gqa).
3. MemTracker's module tracker uses "any"-mode hooks (no leaked embedding output + grad).
4. CUDA's autocast op lists under CPU autocast; `torch.is_autocast_enabled()` answers for the run.
5. bitsandbytes 4-bit: packed weights and quantization states made by hand, CUDA's gemm_4bit
   dispatch (fused kernel or dequantize + linear) replayed with its allocations.
6. generate(): host reads of fake values answered from a narrow real run (ScalarOracle).
7. Lifetimes: the program's own references (`out`) are kept as written, until the step ends.

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
