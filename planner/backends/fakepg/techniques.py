"""torch side of the distributed dry run of a technique's step (rm, dpo, distill, ...): every model of
its Workload built as the single-GPU backends build it, each wrapped with FSDP2 (every decoder layer,
then the model), and the technique's own `step(ctx)` run on rank 0 of a fake process group under
FSDPMemTracker (loaded lazily by planner.backends.fakepg.dry_run_distributed).

One tracker sees every model: it is built on the trained model (whose optimizer it follows) and then
pointed at a container of all of them, so the FSDP units of the frozen ones (their sharded and gathered
parameters) are categorised the same way. Each model is its own FSDP root, as in a program that wraps
a policy and a reference separately. One trained model only (the tracker follows one optimizer).
"""

from __future__ import annotations

import contextlib
import gc
import time

from torch import nn

from planner.backends.dryrun import _patches
from planner.backends.dryrun._build import build_meta, materialize
from planner.backends.dryrun._programs import make_optimizer
from planner.backends.dryrun._run import _versions
from planner.backends.fakepg.sft import (FSDPDryRunTracker, _end_of_loss_backward, _no_fake, _SkipPropagation,
                                             decoder_layers, fake_process_group, make_mesh, mixed_precision_policy,
                                             phase_category_breakdowns, shard, to_categories)
from planner.backends.fakepg.result import DistributedDryRunResult
from planner.engine.distributed.layout import Layout, LayoutError


def run_technique(plan, layout: Layout, *, steps: int, round_bytes: int, device: str) -> DistributedDryRunResult:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from planner.backends.tracked import TrackedContext, _loss_phase_hooks
    from planner.models import load_model, model_config
    from planner.plugins import technique

    t0 = time.perf_counter()
    tech = technique(plan.task)
    workload = tech.workload(plan, load_model(plan.model))
    trained = [u for u in workload.models if u.trainable]
    if len(trained) != 1:
        raise LayoutError(f"task: the distributed dry run follows one trained model; {plan.task} trains "
                          f"{len(trained)}")
    if any(ph.kind == "generate" for ph in workload.phases):
        raise LayoutError(f"task: the distributed dry run does not replay generation ({plan.task})")
    configs = {u.role: model_config(u.source) for u in workload.models}
    notes: list[str] = []
    gc.collect()
    with fake_process_group(layout.gpus):
        dp_mesh, _ = make_mesh(layout.dp, 1)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patches.transformers_not_tracing(answer_reads=True))
            stack.enter_context(_patches.autocast_query_means_cpu())
            stack.enter_context(_patches.cuda_autocast_policy())
            metas = {}
            for u in workload.models:
                metas[u.role], build_notes = build_meta(u.setup, configs[u.role], train=u.trainable, head=u.spec.head)
                notes += build_notes
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if device == "fake" else None
            models = {role: materialize(m, fake_mode).model for role, m in metas.items()}
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                with _no_fake():  # DeviceMesh reads its coordinates (nonzero) on real tensors
                    for u in workload.models:
                        shard(models[u.role], dp_mesh, u.setup, layout)
            policies = {u.role: str(mixed_precision_policy(u.setup)) for u in workload.models}
            notes.append(f"FSDP2 fully_shard per decoder layer + root of every model ({', '.join(models)}), "
                         f"reshard_after_forward={layout.fsdp == 'full-shard'}")
            local = {"rank_params": sum(p.to_local().numel() for m in models.values() for p in m.parameters())}
            if fake_mode is not None:
                stack.enter_context(fake_mode)
            main = trained[0].role
            opt, opt_notes = make_optimizer(trained[0].setup,
                                            [p for p in models[main].parameters() if p.requires_grad], None)
            notes += opt_notes
            tracker = FSDPDryRunTracker(models[main], opt, round_bytes)
            tracker._root_mod = nn.ModuleDict(models)  # instrument every model's FSDP units
            stack.enter_context(_SkipPropagation(tracker))
            stack.enter_context(tracker)
            # FSDPMemTracker refuses a second root forward without a reset of its module stats: reset
            # them once a step, at the trained model's forward (a frozen model may run between that
            # forward and its backward, whose hooks need the trained model's stats)
            stack.callback(models[main].register_forward_pre_hook(lambda *_: tracker.reset_mod_stats(),
                                                                  prepend=True).remove)
            stack.callback(decoder_layers(models[main])[-1].register_forward_hook(_end_of_loss_backward(tracker)).remove)
            for h in _loss_phase_hooks(models, tracker):
                stack.callback(h.remove)
            ctx = TrackedContext(plan, workload, models, {main: opt}, tracker, device, configs)
            baseline = tracker.total
            tracker.peak_total = 0
            tracker.phase_peaks = {}
            tracker.__dict__["phase_snapshots"] = {}
            step_end: list[int] = []
            try:
                for i in range(steps):
                    ctx.step_index = i
                    tracker.step = i
                    tech.step(ctx)
                    tracker.phase = "between_steps"
                    ctx.release()  # the step's locals go when it returns, as in the engine and the other backends
                    step_end.append(tracker.total)
            finally:
                ctx.release()

    breakdown, details = to_categories(tracker.peak_categories, tracker.peak_opt_state)
    assert sum(breakdown.values()) == tracker.peak_total, (breakdown, tracker.peak_total)
    phase_breakdowns = phase_category_breakdowns(tracker)
    versions = _versions()
    versions["process_group"] = "fake"
    return DistributedDryRunResult(
        layout=layout.model_dump(), world_size=layout.gpus, rank=0, mesh={"dp": layout.dp, "tp": 1},
        mixed_precision_policy="; ".join(f"{r}: {p}" for r, p in policies.items()),
        peak_allocated_bytes=tracker.peak_total, breakdown=breakdown, details={k: v for k, v in details.items() if v},
        peak_phase=tracker.peak_phase, peak_step=max(tracker.peak_step, 0), peak_op=tracker.peak_op,
        peak_module=tracker.peak_module,
        phases={k: v for k, v in tracker.phase_peaks.items() if k not in ("setup", "between_steps")},
        phase_breakdowns=phase_breakdowns, step_end_bytes=step_end, params={**local, "baseline_bytes": baseline},
        wall_s=round(time.perf_counter() - t0, 3), device=device, versions=versions,
        notes=notes + [f"technique {plan.task}: models {', '.join(models)}; trained {main}"],
    )
