"""`estimate(plan, model)`: per-GPU memory of one step, from a cached symbolic timeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.architecture import ModelSpec
from planner.engine import generation, scoring, training
from planner.engine.heads import TILED_HEADS, FusedTiles
from planner.engine.resident import resident
from planner.engine.evaluate import finish
from planner.engine.runtime import cublas_workspace_bytes
from planner.engine.timeline import CompiledTimeline
from planner.result import CATEGORIES, MemoryEstimate
from planner.plugins import technique
from planner.specs import Plan
from planner.workload import ModelUse, Phase, Workload

if TYPE_CHECKING:
    from planner.engine.resident import Resident
    from planner.gpus import GPUSpec

DEFAULT_CUDA_CONTEXT = 547_356_672  # measured H200 context: (139.80 - 139.29) GiB, rounded to 2 MiB

# Plan fields that change a timeline's shape (everything but the batch and lengths).
_SHAPE_FIELDS = ("method", "precision", "optimizer", "grad_ckpt", "attn", "lora_rank",
                 "lora_targets", "quant", "double_quant", "kbit_prep")

_BUILDERS = {"train_step": training.build, "generate": generation.build, "score": scoring.build,
             "forward": scoring.build_forward}
_cache: dict[tuple, tuple] = {}


def _compiled(kind: str, use: ModelUse, loss: str = "causal_lm", tiles: FusedTiles | None = None,
              adapters: bool = True, passes: int = 1, autocast: bool = False, accumulating: bool = False,
              keeps_previous: bool = True) -> tuple:
    spec, setup = use.spec, use.setup
    d = setup.__dict__
    key = (kind, loss, tiles, adapters, passes, autocast, accumulating, keeps_previous, id(spec), spec.id,
           spec.num_params) + tuple(d[f] for f in _SHAPE_FIELDS)
    hit = _cache.get(key)
    if hit is None or hit[0] is not spec:
        if kind == "train_step":
            built = training.build(spec, setup, loss, tiles, passes, accumulating, keeps_previous)
        elif kind == "score":
            built = scoring.build(spec, setup, loss, tiles, adapters, autocast)
        elif kind == "forward":
            built = scoring.build_forward(spec, setup, autocast)
        else:
            built = _BUILDERS[kind](spec, setup)
        hit = (spec, *built)
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = hit
    return hit


def compile_phase(ph: Phase, use: ModelUse) -> tuple[CompiledTimeline, "Resident", dict[str, int]]:
    """The compiled timeline (cached), resident bytes and resident details of one phase's program
    run by `use` (its loss, the fused head's tiles for its scored positions, adapters on or off,
    passes, autocast)."""
    # the fused head's buffers depend on the scored positions: batch x (seq - 1)
    tiles = FusedTiles.for_positions(ph.batch * (ph.seq - 1)) if ph.loss in TILED_HEADS else None
    _, timeline, res, extra = _compiled(ph.kind, use, ph.loss, tiles, ph.adapters, ph.passes, ph.autocast,
                                        ph.micro_batches > 1, ph.keeps_previous)
    return timeline, res, extra


def estimate(plan: Plan, model: ModelSpec, gpu: "GPUSpec | None" = None) -> MemoryEstimate:
    """Per-GPU memory of one step of `plan` on `model`; `gpu` sets the CUDA context and the cuBLAS
    workspace size (without it: the measured H200 context and sm90's workspace)."""
    workload = technique(plan.task).workload(plan, model)
    return estimate_workload(workload, gpu)


def estimate_workload(workload: Workload, gpu: "GPUSpec | None" = None) -> MemoryEstimate:
    """The peak over the workload's phases; models not running in a phase stay resident in it."""
    context = gpu.cuda_context_bytes if gpu is not None else DEFAULT_CUDA_CONTEXT
    cc = gpu.compute_capability if gpu is not None else "9.0"
    best: MemoryEstimate | None = None
    phases: dict[str, int] = {}
    multi = len(workload.phases) > 1
    for ph in workload.phases:
        use = workload.model(ph.role)
        timeline, res, extra = compile_phase(ph, use)
        if ph.kind == "generate":
            mem = generation.evaluate(timeline, res, extra, ph.batch, ph.seq, ph.new_tokens, use.spec, use.setup,
                                      context, cublas_workspace_bytes(cc, 1))
        else:
            threads = 2 if ph.kind == "train_step" else 1
            carried = ph.carried * ph.batch * ph.seq
            if ph.during is not None:  # another phase's forward graph is alive while this one runs
                host = workload.phase(ph.during)
                host_tl = compile_phase(host, workload.model(host.role))[0]
                carried += int(host_tl.after_forward.at(host.batch * host.seq, host.seq))
            mem = finish(timeline, extra, ph.batch * ph.seq, ph.seq, context, cublas_workspace_bytes(cc, threads),
                         carried=carried)
        # frozen models another phase uses: on the GPU only if the plan keeps them resident
        placement = getattr(use.setup, "frozen_placement", "resident")
        others = [m for m in workload.models if m.role != ph.role and (m.trainable or placement == "resident")]
        if placement == "separate" and not use.trainable:
            continue  # this phase runs on another GPU: not this one's memory
        # a trainable model's optimizer states persist through the step's other phases
        own_states = use if use.trainable and ph.kind != "train_step" else None
        if others or own_states:
            mem = _with_resident(mem, others, own_states)
        if ph.micro_batches > 1 and ph.kind != "train_step":
            mem = _accumulating(mem, ph, workload)
        if not multi:
            return mem
        for name, v in mem.phases.items():
            phases[f"{ph.name}.{name}" if multi else name] = v + (mem.peak_allocated_bytes - max(mem.phases.values()))
        if best is None or mem.peak_allocated_bytes > best.peak_allocated_bytes:
            best = mem.model_copy(update={"peak_phase": f"{ph.name}.{mem.peak_phase}" if multi else mem.peak_phase})
    assert best is not None, "a workload has at least one phase"
    return best.model_copy(update={"phases": phases})


def _accumulating(mem: MemoryEstimate, ph: Phase, workload: Workload) -> MemoryEstimate:
    """A phase of a later micro-batch (gradient accumulation): the trained models' gradients exist
    (accumulated so far), and the previous micro-batch's outputs that the program rebinds only
    after this phase are still bound (`ph.previous`: that train_step phase's held outputs and what
    it carried). The first micro-batch of a step has neither (zero_grad(set_to_none=True), and the
    previous step's outputs went when it ended): the later ones peak."""
    add = {c: 0 for c in CATEGORIES}
    for m in workload.models:
        if m.trainable:
            add["gradients"] += resident(m.spec, m.setup).grad_bytes
    if ph.previous is not None:
        host = workload.phase(ph.previous)
        tl = compile_phase(host, workload.model(host.role))[0]
        add["activations"] += int(tl.held.at(host.batch * host.seq, host.seq)) + host.carried * host.batch * host.seq
    return _plus(mem, add)


def _with_resident(mem: MemoryEstimate, others: list[ModelUse], own_states: ModelUse | None = None) -> MemoryEstimate:
    """Add the models that are resident but idle during this phase (their weights, and the optimizer
    states of trainable ones), and the running model's optimizer states when the phase is not its
    training step."""
    from planner.engine.optimizers import optimizer_memory

    add = {c: 0 for c in CATEGORIES}
    if own_states is not None:
        r = resident(own_states.spec, own_states.setup)
        add["optimizer_states"] += optimizer_memory(own_states.setup.optimizer, r, own_states.spec.num_layers).state_bytes
    for m in others:
        r = resident(m.spec, m.setup)
        add["parameters"] += r.param_bytes
        add["buffers"] += r.buffer_bytes
        add["other"] += r.quant_state_bytes
        if m.trainable:
            add["optimizer_states"] += optimizer_memory(m.setup.optimizer, r, m.spec.num_layers).state_bytes
    return _plus(mem, add)


def _plus(mem: MemoryEstimate, add: dict[str, int]) -> MemoryEstimate:
    """`mem` with `add` bytes per category live at every moment of the phase (its peak, reserved and
    device figures, breakdown and per-phase peaks raised by their sum)."""
    extra = sum(add.values())
    breakdown = {c: mem.breakdown.get(c, 0) + add.get(c, 0) for c in CATEGORIES}
    return mem.model_copy(update={
        "peak_allocated_bytes": mem.peak_allocated_bytes + extra, "reserved_bytes": mem.reserved_bytes + extra,
        "device_bytes": mem.device_bytes + extra, "breakdown": breakdown,
        "phases": {k: v + extra for k, v in mem.phases.items()},
    })
