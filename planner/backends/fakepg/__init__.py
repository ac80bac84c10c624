"""Distributed dry runs: one rank of an FSDP / TP / FSDP x TP training step, at full scale, on one CPU.

`dry_run_distributed(plan, layout)` runs rank 0 of `layout.gpus` ranks in a fake process group
(`dist.init_process_group(backend="fake", ...)`, FakeStore: collectives return at once and move no
data) on fake tensors (FakeTensorMode: shapes only, ~no real memory), and measures what that rank
allocates with a MemTracker. The program is the single-GPU dry run's (planner.backends.dryrun: the model built
by transformers on meta, the heldout-protocol training loop, AdamW foreach, the patches that make
transformers behave as on CUDA), with the model parallelised the way torch does it:

- FSDP (layout.fsdp): FSDP2 `fully_shard` on every decoder layer and on the root (embeddings, final
  norm, lm_head), `reshard_after_forward=True` for full-shard, False for shard-grad-op. Plans in bf16 /
  fp16 shard their half-precision parameters as they are; mixed-* plans shard fp32 parameters with
  `MixedPrecisionPolicy(param_dtype=<half>, reduce_dtype=fp32)` and run without autocast (the policy
  casts the parameters; activations are then half precision). Measured with torch's
  `FSDPMemTracker` (sharded / unsharded parameters and gradients, all-gather and reduce-scatter
  buffers are categories of their own).
- TP (layout.tp > 1): `parallelize_module` per decoder layer: q, k, v, gate, up ColwiseParallel;
  o, down RowwiseParallel. With `vocab="parallel"` (default, Megatron's and torchtitan's layout, the
  one planner.engine.distributed.ranks assumes) the embedding is RowwiseParallel (vocab-sharded) and lm_head
  ColwiseParallel with vocab-sharded logits, the loss under `loss_parallel()`; with
  `vocab="replicated"` both stay whole on every rank (transformers' own tp_plan keeps the embedding
  whole and gathers the logits). Measured with planner.backends.dryrun's tracker.
- FSDP x TP: a 2-D mesh (dp, tp); TP first, then fully_shard over the dp sub-mesh.

What makes the fake-PG replay count what a GPU rank allocates (each seen in practice):
1. DTensor's sharding propagation runs the op on GLOBAL-shaped fake tensors under the ambient
   FakeTensorMode (`detect_fake_mode()`); the tracker would count them (and, as some sit in
   reference cycles, keep counting them until a garbage collection: tens of GiB of phantom optimizer
   memory at 7B). Ops inside `ShardingPropagator._propagate_tensor_meta_non_cached` are not tracked.
2. `_c10d_functional.wait_tensor`'s fake kernel returns a new tensor; on a GPU it returns its input.
3. DTensor ops are left to DTensor (the tracker sees the local ops), as FSDPMemTracker does.
4. Storages rounded up to 512 bytes (CUDA's caching allocator), module hooks in "any" mode
   (planner.backends.dryrun._tracker), FSDPMemTracker's per-module snapshots skipped (only the global peak).
The rank is rank 0: with uneven shards (FSDP pads dim 0 to a multiple of the mesh size) it holds the
largest shard, so its peak is the job's.

Techniques other than sft (rm, dpo, distill: planner.backends.fakepg.techniques): every model of
the technique's workload FSDP2-wrapped the same way, the technique's own `step(ctx)` run on them,
one FSDPMemTracker over all of them; FSDP only, one trained model, no generation.

Not covered: pipeline parallelism, sequence parallelism, DeepSpeed ZeRO (see
planner.backends.deepspeed_run for real ZeRO partitions), offload, LoRA/QLoRA under FSDP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from planner.backends.fakepg.result import CATEGORIES, FSDP_CATEGORY, FSDP_DETAIL, DistributedDryRunResult
from planner.engine.distributed.layout import Layout, LayoutError

if TYPE_CHECKING:
    from planner.specs import Plan

Vocab = Literal["parallel", "replicated"]

__all__ = ["CATEGORIES", "FSDP_CATEGORY", "FSDP_DETAIL", "DistributedDryRunResult", "check_supported",
           "compare_with_estimate", "dry_run_distributed", "estimate_moments"]


def check_supported(layout: Layout) -> None:
    """One-line LayoutError for what this harness does not run."""
    if layout.pp > 1:
        raise LayoutError("pp: the distributed dry run covers FSDP and TP, not pipeline stages")
    if layout.sp:
        raise LayoutError("sp: the distributed dry run does not run sequence parallelism")
    if layout.offload != "none":
        raise LayoutError("offload: the distributed dry run does not offload")
    if layout.fsdp is None and layout.stage > 0:
        raise LayoutError(f"zero: DeepSpeed ZeRO-{layout.stage} is not replayed here (planner.backends.deepspeed_run "
                          "runs it for real); use fsdp full-shard / shard-grad-op")
    if layout.fsdp is None and layout.dp > 1:
        raise LayoutError(f"gpus: {layout.dp} data-parallel replicas without sharding (DDP) are not replayed; "
                          "use fsdp, or gpus = tp")


def dry_run_distributed(plan: "Plan", layout: Layout, config: dict | None = None, *, steps: int = 2,
                        round_bytes: int = 512, vocab: Vocab = "parallel",
                        device: Literal["fake", "cpu"] = "fake") -> DistributedDryRunResult:
    """Replay rank 0 of `plan` laid out as `layout` (FSDP, TP or both) and measure its memory.

    config: the model's config.json dict (default: planner.models.model_config(plan.model)).
    steps: optimizer steps (the peak is usually in the second: optimizer states exist).
    device: "fake" (full scale, shapes only) or "cpu" (real tensors, tiny configs: same accounting).
    A fake process group of layout.gpus ranks is created for the run and destroyed after it; a
    process group already initialised in this process is an error.
    """
    check_supported(layout)
    if plan.task != "sft":
        return _dry_run_technique(plan, layout, config, steps=steps, round_bytes=round_bytes, device=device)
    if plan.method != "full":
        raise LayoutError(f"method: the distributed dry run covers full fine-tuning, not {plan.method}")
    if plan.batch != layout.micro_batch:
        raise LayoutError(f"batch: the plan's micro-batch {plan.batch} differs from the layout's {layout.micro_batch}")
    if device not in ("fake", "cpu"):
        raise ValueError("device must be 'fake' (full scale on fake tensors) or 'cpu' (real tensors)")
    if config is None:
        from planner.models import model_config

        config = model_config(plan.model)
    from planner.backends.fakepg.sft import run

    return run(plan, layout, config, steps=steps, round_bytes=round_bytes, vocab=vocab, device=device)


def _dry_run_technique(plan: "Plan", layout: Layout, config: dict | None, *, steps: int, round_bytes: int,
                       device: str) -> DistributedDryRunResult:
    """A technique's own step (planner.backends.fakepg.techniques): FSDP2 over every model of
    its workload, full fine-tuning of its one trained model; each model's config is the one its
    workload names (`config` is refused: it would be ambiguous between models)."""
    if layout.fsdp is None or layout.tp > 1:
        raise LayoutError(f"task: the distributed dry run of {plan.task} covers FSDP (every model wrapped), not TP")
    if plan.method != "full":
        raise LayoutError(f"method: the distributed dry run covers full fine-tuning, not {plan.method}")
    if config is not None:
        raise LayoutError(f"config: {plan.task} loads each model's config from its workload; pass none")
    if plan.batch != layout.micro_batch:
        raise LayoutError(f"batch: the plan's micro-batch {plan.batch} differs from the layout's {layout.micro_batch}")
    if device not in ("fake", "cpu"):
        raise ValueError("device must be 'fake' (full scale on fake tensors) or 'cpu' (real tensors)")
    from planner.backends.fakepg.techniques import run_technique

    return run_technique(plan, layout, steps=steps, round_bytes=round_bytes, device=device)


def compare_with_estimate(result: DistributedDryRunResult, plan: "Plan", layout: Layout, spec, gpu) -> dict[str, Any]:
    """Per-rank peak of `estimate_distributed` next to the dry run's, and the terms that differ.

    The estimate's `other` (cuBLAS workspaces) has no counterpart in a dry run: `estimate_wo_other`
    leaves it out, and the error is taken on that."""
    from planner.engine.distributed import estimate_distributed

    est = estimate_distributed(plan, layout, spec, gpu).memory
    wo = est.peak_allocated_bytes - est.breakdown.get("other", 0)
    return {
        "estimate": est.peak_allocated_bytes,
        "estimate_wo_other": wo,
        "dry_run": result.peak_allocated_bytes,
        "error": wo / result.peak_allocated_bytes - 1,
        "estimate_phase": est.peak_phase,
        "dry_run_phase": result.peak_phase,
        "terms": {k: {"estimate": est.breakdown.get(k, 0), "dry_run": result.breakdown.get(k, 0)} for k in CATEGORIES},
        "estimate_details": dict(est.details),
    }


def estimate_moments(plan: "Plan", layout: Layout, spec, gpu) -> dict[str, dict[str, float]]:
    """The moments `estimate_distributed` takes the largest of ("loss", "loss backward", "backward",
    "end of backward", "optimizer"; the dry run's "backward" phase spans the two backward moments),
    each as a breakdown, for comparing with the dry run's phase_breakdowns. Captures
    the arguments of ranks._rank_memory and evaluates the same moments (ranks.rank_moments)."""
    from planner.engine.distributed import ranks as est_mod

    seen: list[tuple] = []
    orig = est_mod._rank_memory

    def capture(stage, states, buffers, acts, step_temp, workspace, gpu_, layout_):
        seen.append((stage, states, buffers, acts, step_temp, workspace))
        return orig(stage, states, buffers, acts, step_temp, workspace, gpu_, layout_)

    est_mod._rank_memory = capture
    try:
        est = est_mod.estimate_sft(plan, layout, spec, gpu)
    finally:
        est_mod._rank_memory = orig
    stage, states, buffers, acts, step_temp, workspace = next(x for x in seen if x[0] == est.memory.stage)
    gathered = states.gpu.get("gathered", 0.0)
    moments = est_mod.rank_moments(states, buffers, acts, step_temp, workspace, layout)
    out = {}
    for name, m in moments.items():
        bd = {k: float(m.get(k, 0.0)) for k in CATEGORIES}
        bd["detail:zero3_gathered"] = float(gathered) if name != "optimizer" else 0.0
        out[name] = bd
    return out


__all__ = ["DistributedDryRunResult", "check_supported", "compare_with_estimate", "dry_run_distributed",
           "estimate_moments"]
