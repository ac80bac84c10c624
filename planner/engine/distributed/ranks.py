"""`estimate_distributed(plan, layout, spec, gpu)`: memory of the busiest rank, the collectives of one
step, and the step time (compute + exposed communication + pipeline bubble), tokens/s and MFU.

Memory of a rank (pipeline stage k; the first and the last stage are evaluated, the larger reported):
    model states      zero.rank_model_states: its TP/PP share, partitioned by the ZeRO/FSDP stage,
                      offloaded parts on the CPU; + the ZeRO-3 gathered working set
    activations       what its layers keep for backward × the micro-batches in flight
                      (activations.py; "engine": the transformers program replayed by our engine on the
                      rank's TP-split layer; "megatron": Korthikanti's formulas)
    transients        one layer's forward / recompute + its backward's gradients of activations
    head (last stage) the engine's own head and loss program (planner.engine.heads: causal_lm for sft)
                      replayed on the rank's vocab-parallel share (vocab ceil(V/t)): what it keeps for
                      backward (the fp32 log-probabilities, the final norm's saved tensors), what the
                      program holds (transformers' `out.logits`), its largest forward moment and its
                      backward's temporaries (two fp32 b·s·V/t tensors for causal_lm)
    runtime           cuBLAS workspaces (two threads); `reserved` adds the allocator's rounding
                      (engine.runtime), `device` the CUDA context (NCCL's buffers are not modelled)
The peak is the largest of five moments: the head's forward and the loss's backward (last stage), a
layer's backward with every micro-batch in flight (gradients live when they accumulate over
micro-batches or pipeline steps), the end of the backward (the gradients of all layers but one done,
one layer's activations left), and the optimizer step (all gradients, the optimizer's temporaries,
the held logits); `phases` reports each.
CPU memory per node = the busiest rank's offloaded states × GPUs on a node.

Step time (the slowest stage sets the pipeline's pace):
    compute       m × (forward + backward + recompute of one micro-batch) + the optimizer step
    exposed comm  TP and PP collectives (on the critical path) + what the compute windows cannot hide
                  of the DP / ZeRO collectives (comm.py says which overlap)
    bubble        (p − 1)/v × one micro-batch's time (= bubble_fraction × the pipeline's busy time)
tokens/s = global batch × seq / step time; MFU = model FLOPs (no recompute) / (step time × GPUs × peak).

Every other training technique (rm, dpo, distill, grpo, ppo, a plugin's) goes to
planner.engine.distributed.techniques, which applies the same per-rank model to each model and phase of the
technique's Workload.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from planner.architecture import ModelSpec
from planner.engine.optimizers import optimizer_memory
from planner.engine.resident import lora_targets, resident
from planner.engine.runtime import cublas_workspace_bytes, reserved_bytes
from planner.engine.tape import DTYPE_BYTES, ZERO
from planner.engine.timing import train_micro_batch
from planner.gpus import GPUSpec
from planner.engine.distributed import activations as act
from planner.engine import compute
from planner.engine.distributed import comm
from planner.engine.distributed.layout import Layout, LayoutError
from planner.engine.distributed.shard import busiest_stages, rank_spec
from planner.engine.distributed.zero import RankStates, engine_description, fsdp_moment_gathered, rank_model_states, semantics
from planner.specs import Plan

ActivationModel = Literal["engine", "megatron"]
CPU_OPTIMIZER_BYTES_PER_S = 100e9  # per node: a CPU Adam step is memory-bound on the host (assumed)
ADAM_MASTER_BYTES_PER_PARAM = 4 * 7 + 2  # fp32 master, grad, m, v read; master, m, v written; half copy written


class CollectiveReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    group: str
    group_size: int
    count: int = Field(description="calls per optimizer step")
    tensor_bytes: float = Field(description="the full tensor of one call")
    bytes_per_rank: float = Field(description="sent by each rank over the step")
    time_s: float
    exposed_s: float
    overlapped: bool
    link: str


class RankMemory(BaseModel):
    model_config = ConfigDict(frozen=True)

    stage: int
    peak_allocated_bytes: int
    reserved_bytes: int
    device_bytes: int
    peak_phase: str
    breakdown: dict[str, int]
    details: dict[str, int] = Field(default_factory=dict)
    cpu_bytes: int = Field(default=0, description="offloaded model states of this rank in CPU memory")


class StepTime(BaseModel):
    model_config = ConfigDict(frozen=True)

    compute_s: float = Field(description="forward, backward, recompute and optimizer step on the slowest stage")
    exposed_comm_s: float
    bubble_s: float
    total_s: float
    optimizer_s: float = Field(description="part of compute_s (on the CPU when the optimizer is offloaded)")
    micro_batch_s: float = Field(description="one micro-batch's compute + exposed TP/PP comm on the slowest stage")


class DistributedEstimate(BaseModel):
    model_config = ConfigDict(frozen=True)

    layout: Layout
    semantics: str
    memory: RankMemory = Field(description="the busiest rank")
    stages: list[RankMemory] = Field(description="first and last pipeline stage")
    cpu_bytes_per_node: int
    gpu_memory_bytes: int
    cpu_memory_bytes: int = Field(description="a node's CPU memory (the layout's cpu_memory), which the offloaded states must fit")
    engine: str = Field(description="what holds the model states and in which dtypes (zero.engine_description)")
    fits: bool = Field(description="the busiest rank fits its GPU and the node's offloaded states fit its CPU memory")
    collectives: list[CollectiveReport]
    time: StepTime
    model_flops: float = Field(description="per step, whole job, no recompute")
    hardware_flops: float = Field(description="per step, whole job, with recompute")
    tokens_per_s: float
    mfu: float
    tflops_per_gpu: float = Field(description="hardware FLOPs per GPU per second (Megatron's figure)")
    efficiency: dict[str, float | str]
    technique: str = "sft"
    phases: dict[str, int] = Field(default_factory=dict, description=(
        "peak allocated bytes of the busiest rank at each moment of each phase ('policy.loss backward', "
        "'reference.forward', 'rollout.decode'; sft: its moments)"))
    phase_seconds: dict[str, float] = Field(default_factory=dict, description="step time by phase (all micro-batches)")
    resident: dict[str, list[str]] = Field(default_factory=dict, description="models on the busiest rank in each phase")
    model_states: dict[str, dict[str, float]] = Field(default_factory=dict, description=(
        "each model's states on one rank (GPU bytes by kind: parameters, gradients, optimizer_states, gathered)"))


# ---- activations ---------------------------------------------------------------------------------
_layer_cache: dict[tuple, tuple] = {}


def _engine_layer(part: ModelSpec, plan: Plan, origin: ModelSpec, tp: int) -> tuple:
    """(saved per layer, forward peak candidates, backward transient, residual dtype, prologue) as
    Syms, from the engine's replay of one decoder layer of `part` (cached per shape).

    The only place that reaches into the engine's internals (planner.engine.training); it accepts a
    LayerRun with either one `peak` or a list of `peaks` candidates. A layer's shape depends only on the
    model (`origin`) and the TP degree it is split by, so every pipeline stage shares one replay."""
    key = (id(origin), tp, plan.method, plan.precision, plan.attn, plan.lora_rank, plan.lora_targets, plan.quant,
           plan.double_quant, plan.kbit_prep, plan.grad_ckpt)
    hit = _layer_cache.get(key)
    if hit is None or hit[0] is not origin:
        from planner.engine import training as tr

        res = resident(part, plan)
        cfg = tr.layer_cfg(part, plan, res)
        input_rg = plan.method == "full" or plan.grad_ckpt
        first = tr.run_layer(cfg, res.non_linear_dtype, input_rg)
        steady = tr.run_layer(cfg, first.out_dtype, True)
        peaks = list(getattr(steady, "peaks", None) or [steady.peak])
        bwd = tr.backward_transient(cfg, plan.compute_dtype, steady.out_dtype)
        rope = tr.prologue_kept(part, cfg, res.non_linear_dtype, input_rg)
        hit = (origin, steady.saved, peaks, bwd, steady.out_dtype, rope)
        if len(_layer_cache) > 1024:
            _layer_cache.clear()
        _layer_cache[key] = hit
    return hit[1:]


_head_cache: dict[tuple, tuple] = {}


def _engine_head(part: ModelSpec, plan: Plan, origin: ModelSpec, tp: int, loss: str, res_dtype: str,
                 positions: int = 1 << 30) -> tuple:
    """(forward peak, saved, held, backward temporaries) as Syms per token of the last stage's head
    and loss program, from the engine's own head (planner.engine.heads) replayed on the rank's
    vocab-parallel share (`part` has vocab_size ceil(V/t)): the batch x seq x vocab tensors divide by t.
    forward peak = the largest live moment after the last layer (the previous step's held tensors
    included where the program still binds them). `positions`: the scored positions of one forward,
    which size a tiled (fused) head's buffers as the engine sizes them."""
    from planner.engine.heads import HEADS, TILED_HEADS, FusedTiles

    tiles = FusedTiles.for_positions(positions) if loss in TILED_HEADS else None
    key = (id(origin), tp, loss, res_dtype, tiles, plan.method, plan.precision, plan.lora_rank, plan.lora_targets,
           plan.quant, plan.double_quant, plan.kbit_prep, plan.grad_ckpt, part.head)
    hit = _head_cache.get(key)
    if hit is None or hit[0] is not origin:
        from planner.engine import training as tr

        res = resident(part, plan)
        cfg = tr.layer_cfg(part, plan, res)
        if loss not in HEADS:
            raise LayoutError(f"loss: the engine has no head '{loss}' (known: {', '.join(sorted(HEADS))})")
        full = plan.method == "full"
        head = (HEADS[loss](part, cfg, res, res_dtype, full, tiles=tiles) if tiles is not None
                else HEADS[loss](part, cfg, res, res_dtype, full))
        fwd = [live + (head.prev_held if with_prev else ZERO) for _ph, _what, live, _d, with_prev in head.forward]
        bwd = [temps for _what, temps, _d in head.backward]
        hit = (origin, fwd, head.saved, head.held, bwd)
        if len(_head_cache) > 1024:
            _head_cache.clear()
        _head_cache[key] = hit
    return hit[1:]


def _activations(spec: ModelSpec, plan: Plan, layout: Layout, stage: int, model: ActivationModel,
                 rows: int | None = None, seq: int | None = None, loss: str = "causal_lm") -> dict[str, float]:
    """Activation bytes of one rank of `stage` for a micro-batch of `rows` sequences of `seq` tokens
    (default: the layout's micro-batch and the plan's seq) whose loss program is `loss`:
    activations  kept by its layers for all micro-batches in flight (+ the rotary tables)
    transient    one layer's forward / recompute and backward on top of that
    loss_fwd     last stage, in the forward: the head's largest moment (logits, their fp32 copies, ...)
    loss_saved   last stage, at the loss's backward: what the head and loss keep for backward
    loss_temp    ... and the largest set of temporaries of the loss's backward
    held         last stage: what the program keeps referenced through backward and the optimizer
                 step (transformers' `out.logits`; with the megatron model, Korthikanti's output layer)"""
    b = layout.micro_batch if rows is None else rows
    s = plan.seq if seq is None else seq
    tokens = b * s
    t, sp, pp = layout.tp, layout.sp, layout.pp
    part = rank_spec(spec, t, pp, stage)
    flight = act.in_flight(pp, stage, layout.grad_accum, layout.chunks)
    last = stage == pp - 1
    if model == "megatron":
        rec = "full" if plan.grad_ckpt else "none"
        h, a = spec.hidden_size, spec.num_attention_heads
        kept = act.korthikanti_layer_bytes(s, b, h, a, t, sp, rec) * part.num_layers * flight
        one = act.korthikanti_layer_bytes(s, b, h, a, t, sp, "none")
        head = act.korthikanti_output_bytes(s, b, h, spec.vocab_size, t) if last else 0.0
        return {"activations": kept, "transient": one if plan.grad_ckpt else 0.0, "loss_fwd": 0.0,
                "loss_saved": head, "loss_temp": 0.0, "held": 0.0}
    # engine: replay the rank's layer (TP-split shapes); with SP replay the full layer and divide by t
    shape = rank_spec(spec, 1, pp, stage) if sp else part
    saved_sym, peaks, bwd_sym, res_dtype, rope = _engine_layer(shape, plan, spec, 1 if sp else t)
    div = t if sp else 1
    saved, bwd = saved_sym.at(tokens, s), bwd_sym.at(tokens, s)
    peak = max(p.at(tokens, s) for p in peaks)  # one layer's forward, its input included
    if plan.grad_ckpt:
        per_layer = spec.hidden_size * DTYPE_BYTES[res_dtype] * tokens / div  # the checkpointed input
        transient = max(peak, saved + bwd) / div  # its recompute, then its backward on the recomputed tensors
    else:
        per_layer = saved / div
        transient = max(peak - saved, bwd) / div
    kept = per_layer * part.num_layers * flight + rope.at(tokens, s) * flight
    # at the last layer's backward (layer 0, last micro-batch): its own kept bytes and the rotary tables
    end_kept = per_layer + rope.at(tokens, s)
    out = {"activations": kept, "transient": transient, "loss_fwd": 0.0, "loss_saved": 0.0, "loss_temp": 0.0,
           "held": 0.0, "end_kept": end_kept, "layers": float(part.num_layers)}
    if last:
        fwd, hsaved, held, bwd_temps = _engine_head(rank_spec(spec, t, pp, pp - 1), plan, spec, t, loss, res_dtype,
                                                    positions=b * (s - 1))
        out["loss_fwd"] = max((x.at(tokens, s) for x in fwd), default=0.0)
        out["loss_saved"] = hsaved.at(tokens, s)
        out["loss_temp"] = max((x.at(tokens, s) for x in bwd_temps), default=0.0)
        out["held"] = held.at(tokens, s)
    return out


# ---- collectives -----------------------------------------------------------------------------------
def _collectives(spec: ModelSpec, plan: Plan, layout: Layout, topo: comm.Topology, stage: int,
                 states: RankStates, grad_elems: float, grad_dtype: str, param_bytes_compute: float,
                 rows: int | None = None, seq: int | None = None) -> list[comm.Collective]:
    """The collectives of one training step of `rows` x `seq` micro-batches (default: the layout's
    micro-batch and the plan's seq)."""
    g = comm.groups(layout)
    m, v = layout.grad_accum, layout.chunks
    b = layout.micro_batch if rows is None else rows
    s, h = (plan.seq if seq is None else seq), spec.hidden_size
    e = DTYPE_BYTES[plan.compute_dtype]
    part = rank_spec(spec, layout.tp, layout.pp, stage)
    out: list[comm.Collective] = []
    act_bytes = b * s * h * e
    if layout.tp > 1:
        per_layer = 3 if plan.grad_ckpt else 2  # forward, (recompute), backward: two each
        n = part.num_layers * m * per_layer
        ends = m * ((1 if stage == 0 else 0) + (1 if stage == layout.pp - 1 else 0))  # vocab-parallel embedding / head
        if layout.sp:
            out.append(comm.collective("tp all-gather (sequence parallel)", "all-gather", g["tp"], act_bytes,
                                       2 * n + ends, topo))
            out.append(comm.collective("tp reduce-scatter (sequence parallel)", "reduce-scatter", g["tp"], act_bytes,
                                       2 * n + ends, topo))
        else:
            out.append(comm.collective("tp all-reduce (attention, mlp)", "all-reduce", g["tp"], act_bytes,
                                       2 * n + ends, topo))
    if layout.pp > 1:
        p2p = act_bytes / layout.tp  # Megatron's scatter/gather: each TP rank sends 1/t
        out.append(comm.collective("pp send/recv activations and gradients", "send/recv", g["pp"], p2p,
                                   2 * m * v, topo))
        if spec.tie_word_embeddings:
            tied = -(-spec.vocab_size // layout.tp) * h * DTYPE_BYTES[plan.compute_dtype]
            out.append(comm.collective("tied embedding grad all-reduce (first, last stage)", "all-reduce",
                                       comm.Group("embedding", 2, g["pp"].per_node), tied, 1, topo))
    dp = g["dp"]
    sem = semantics(layout)
    # DDP reduces gradients in their own dtype; DeepSpeed in its communication dtype (the half one),
    # FSDP's MixedPrecisionPolicy in its param dtype (reduce_dtype defaults to it)
    gb = grad_elems * (DTYPE_BYTES[grad_dtype] if layout.stage == 0 else e)
    st = layout.stage
    if layout.dp > 1:
        if st == 0:
            out.append(comm.collective("dp grad all-reduce", "all-reduce", dp, gb, 1, topo, "backward"))
        elif st in (1, 2) and sem == "deepspeed":
            out.append(comm.collective("zero grad reduce-scatter", "reduce-scatter", dp, gb, 1 if st == 1 else m,
                                       topo, "backward"))
            out.append(comm.collective("zero param all-gather after step", "all-gather", dp, grad_elems * e, 1, topo))
        else:  # stage 3, or FSDP shard-grad-op: parameters gathered in forward (and backward for stage 3)
            out.append(comm.collective("zero-3 param all-gather (forward)", "all-gather", dp, param_bytes_compute,
                                       m, topo, "forward"))
            if st == 3:
                out.append(comm.collective("zero-3 param all-gather (backward)", "all-gather", dp,
                                           param_bytes_compute, m, topo, "backward"))
            out.append(comm.collective("zero grad reduce-scatter", "reduce-scatter", dp, gb, m, topo, "backward"))
    if layout.offload_optimizer:
        host = comm.Group("host", 1, 1)
        grads_cpu = states.cpu.get("gradients", 0.0) or gb / max(layout.dp, 1)
        out.append(comm.collective("offload grads to CPU", "host-copy", host, grads_cpu, m if st >= 2 else 1,
                                   topo, "backward"))
        if not layout.offload_params:  # updated half-precision partition copied back after the CPU step
            out.append(comm.collective("offload params back to GPU", "host-copy", host,
                                       grad_elems * e / layout.dp, 1, topo))
    if layout.offload_params:
        host = comm.Group("host", 1, 1)
        out.append(comm.collective("offload param fetch (forward, backward)", "host-copy", host,
                                   param_bytes_compute / layout.dp, 2 * m, topo, "backward"))
    return out


def _exposed(items: list[comm.Collective], fwd: float, bwd: float) -> list[float]:
    """Exposed seconds of each collective. Overlapped ones share the compute window of the pass they
    run in (per micro-batch: forward, or backward + recompute); a DP all-reduce runs in the last
    micro-batch's backward; the first unit of a gather / the last bucket of a reduce is always exposed."""
    exposed = [0.0] * len(items)
    windows: dict[str, list[int]] = {"fwd": [], "bwd": []}
    for i, c in enumerate(items):
        if not c.overlapped:
            exposed[i] = c.time_s
        else:
            windows["fwd" if c.window == "forward" else "bwd"].append(i)
    for name, idx in windows.items():
        if not idx:
            continue
        window = fwd if name == "fwd" else bwd
        # per call: time of one call of each collective in this window, over one micro-batch's window
        per_call = [items[i].time_s / items[i].count for i in idx]
        floor = [items[i].time_s / items[i].count * _first_share(items[i]) for i in idx]
        busy = sum(per_call)
        over = max(sum(floor), busy - window)
        for i, pc in zip(idx, per_call):
            exposed[i] = over * (pc / busy if busy else 0.0) * items[i].count
    return exposed


def _first_share(c: comm.Collective) -> float:
    """Part of one call that cannot overlap: the last DDP/ZeRO bucket, or the first gathered unit."""
    if c.kind == "all-gather":
        return 0.05  # the first of ~20 prefetch units (a layer among tens) is waited for
    return min(1.0, comm.DDP_BUCKET_BYTES / c.tensor_bytes) if c.tensor_bytes else 0.0


# ---- the estimate ----------------------------------------------------------------------------------
def estimate_sft(plan: Plan, layout: Layout, spec: ModelSpec, gpu: GPUSpec, *,
                 activations: ActivationModel = "engine", style: compute.Style = "hf",
                 eff: compute.Efficiency | None = None) -> DistributedEstimate:
    """Per-rank memory, collectives and step time of an sft `plan` laid out as `layout` (called by
    planner.engine.distributed.estimate.estimate_distributed, which checks the micro-batch)."""
    layout.check_model(spec)
    eff = eff or compute.efficiency(gpu)
    profile = _profile(gpu, style)
    topo = comm.topology(layout, gpu)
    m, s = layout.grad_accum, plan.seq
    tokens = layout.micro_batch * s
    targets = lora_targets(spec, plan) if plan.method != "full" else []
    flash = plan.attn == "sdpa"
    ws = cublas_workspace_bytes(gpu.compute_capability, 2)

    stages: list[RankMemory] = []
    mb_times: list[tuple[int, compute.MicroBatchTime]] = []
    per_stage: dict[int, tuple] = {}
    moment_inputs: dict[int, tuple] = {}
    for k in busiest_stages(layout.pp):
        part = rank_spec(spec, layout.tp, layout.pp, k)
        states = rank_model_states(spec, plan, layout, k)
        res = resident(part, plan)
        # FSDP's MixedPrecisionPolicy hands the modules half-precision weights and runs no autocast:
        # a mixed plan's activations are those of the compute dtype's pure plan
        act_plan = (plan.model_copy(update={"precision": plan.compute_dtype})
                    if layout.fsdp and plan.precision.startswith("mixed") else plan)
        acts = {**_activations(spec, act_plan, layout, k, activations), **fsdp_moment_gathered(part, plan, layout)}
        opt = optimizer_memory(plan.optimizer, res, part.num_layers)
        temp = 0.0
        if not layout.offload_optimizer and semantics(layout) == "torch":
            temp = opt.step_temp_bytes / (layout.dp if layout.stage >= 1 else 1)
        stages.append(_rank_memory(k, states, res.buffer_bytes, acts, temp, ws, gpu, layout))
        moment_inputs[k] = (states, res.buffer_bytes, acts, temp)
        if style == "hf" and profile is not None:
            # the rank's share of the replayed program, op by op (planner.engine.timing)
            fwd_s, bwd_s = train_micro_batch(part, plan, profile, layout.micro_batch, s, first_stage=k == 0,
                                             last_stage=k == layout.pp - 1)
            mbt = compute.MicroBatchTime(fwd_s, bwd_s, 0.0)
        else:  # Megatron's fused kernels: their own program style, the roofline of planner.engine.compute
            mbt = compute.micro_batch_time(part, tokens, s, gpu, dtype=plan.compute_dtype, method=plan.method,
                                           grad_ckpt=plan.grad_ckpt, lora_rank=plan.lora_rank,
                                           lora_targets=_part_targets(part, targets), flash=flash, style=style,
                                           tp=layout.tp, sp=layout.sp, eff=eff)
        mb_times.append((k, mbt))
        per_stage[k] = (part, states, res)
    busiest = max(stages, key=lambda r: r.device_bytes)
    b_states, b_buffers, b_acts, b_temp = moment_inputs[busiest.stage]
    sft_phases = {name: int(sum(bd.values()))
                  for name, bd in rank_moments(b_states, b_buffers, b_acts, b_temp, ws, layout).items()}
    k_slow, mbt = max(mb_times, key=lambda x: x[1].total)
    part, states, res = per_stage[k_slow]

    # collectives of the slowest stage's ranks
    grad_elems = res.trainable_elems
    param_bytes_compute = _param_bytes_compute(part, plan, res)
    items = _collectives(spec, plan, layout, topo, k_slow, states, grad_elems, res.trainable_dtype,
                         param_bytes_compute)
    exposed = _exposed(items, mbt.forward, mbt.backward + mbt.recompute)
    per_mb_exposed = sum(x for c, x in zip(items, exposed) if c.group in ("tp", "pp") and c.count >= m) / m
    step_exposed = sum(exposed) - per_mb_exposed * m

    optimizer_s = optimizer_seconds(plan, layout, grad_elems, gpu, eff)

    busy_mb = mbt.total + per_mb_exposed
    compute_s = m * mbt.total + optimizer_s
    bubble_s = (layout.pp - 1) / layout.chunks * busy_mb
    exposed_s = per_mb_exposed * m + step_exposed
    total = compute_s + exposed_s + bubble_s

    whole = compute.micro_batch_flops(spec, layout.batch * s, s, method=plan.method, grad_ckpt=plan.grad_ckpt,
                                      lora_rank=plan.lora_rank, lora_targets=targets, causal=flash)
    peak = compute.peak_flops(gpu, plan.matmul_dtype)
    reports = [CollectiveReport(name=c.name, kind=c.kind, group=c.group, group_size=c.group_size, count=c.count,
                                tensor_bytes=c.tensor_bytes, bytes_per_rank=c.bytes_per_rank, time_s=c.time_s,
                                exposed_s=x, overlapped=c.overlapped, link=c.link) for c, x in zip(items, exposed)]
    cpu_rank = max(r.cpu_bytes for r in stages)
    ranks_per_node = min(layout.gpus, layout.per_node)
    return DistributedEstimate(
        layout=layout, semantics=semantics(layout), memory=busiest, stages=stages,
        cpu_bytes_per_node=cpu_rank * ranks_per_node, gpu_memory_bytes=gpu.memory_bytes,
        cpu_memory_bytes=layout.cpu_memory, engine=engine_description(layout, plan),
        fits=busiest.device_bytes <= gpu.memory_bytes and cpu_rank * ranks_per_node <= layout.cpu_memory,
        collectives=reports,
        time=StepTime(compute_s=compute_s, exposed_comm_s=exposed_s, bubble_s=bubble_s, total_s=total,
                      optimizer_s=optimizer_s, micro_batch_s=busy_mb),
        model_flops=whole.model, hardware_flops=whole.hardware,
        tokens_per_s=layout.batch * s / total, mfu=compute.mfu(whole.model, total, layout.gpus, peak),
        tflops_per_gpu=whole.hardware / (total * layout.gpus) / 1e12,
        efficiency={"matmul": eff.matmul, "memory": eff.memory, "software": eff.software, "source": eff.source},
        phases=sft_phases, model_states={"model": dict(b_states.gpu)},
    )


def _profile(gpu: GPUSpec, style: compute.Style):
    """The device profile of an op-level time (transformers' programs), or None (Megatron's style, a
    card no profile can price)."""
    if style != "hf":
        return None
    from planner.engine.devices import profile_for
    from planner.profiles import ProfileError

    try:
        return profile_for(gpu)
    except ProfileError:
        return None


def _part_targets(part: ModelSpec, targets: list) -> list:
    names = {lin.path for lin in targets}
    return [lin for lin in part.layer_linears if lin.path in names]


def _param_bytes_compute(part: ModelSpec, plan: Plan, res) -> float:
    """Bytes of the rank's parameters as gathered for compute (half for trainable dense weights under
    mixed precision; quantized weights as stored)."""
    if plan.method == "qlora":
        return float(res.param_bytes + res.quant_state_bytes)
    return float(part.num_params * DTYPE_BYTES[plan.compute_dtype]) if plan.method == "full" else float(res.param_bytes)


def optimizer_seconds(plan: Plan, layout: Layout, grad_elems: float, gpu: GPUSpec, eff: compute.Efficiency) -> float:
    """One optimizer step over a rank's partition of `grad_elems` trainable elements: on the GPU
    (memory-bound), or on the host when the optimizer is offloaded (every rank of a node shares it)."""
    if layout.offload_optimizer:
        ranks_per_node = min(layout.gpus, layout.per_node)
        elems = grad_elems / layout.dp
        return elems * ranks_per_node * ADAM_MASTER_BYTES_PER_PARAM / CPU_OPTIMIZER_BYTES_PER_S
    elems = grad_elems / (layout.dp if layout.stage >= 1 else 1)
    return compute.optimizer_step_time(elems, _optimizer_traffic(plan, layout), gpu, eff)


def _optimizer_traffic(plan: Plan, layout: Layout) -> float:
    """Bytes read + written per trainable element by one optimizer step."""
    if plan.optimizer == "sgd":
        return 3 * 4.0
    if plan.optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        return 4 * 4 + 4 * 1.0
    if semantics(layout) == "deepspeed" and plan.compute_dtype != "fp32":
        return ADAM_MASTER_BYTES_PER_PARAM
    w = DTYPE_BYTES[plan.weight_dtype] if plan.method == "full" else 4
    return 7.0 * w


def rank_moments(states: RankStates, buffers: int, acts: dict[str, float], step_temp: float, workspace: int,
                 layout: Layout, loss_in_model: bool = True) -> dict[str, dict[str, float]]:
    """Bytes per category at the moments of a rank's step: the head's forward and the loss's backward
    (last stage), a layer's backward with every micro-batch in flight, and the optimizer step.

    loss_in_model: the loss is computed inside the model's forward (transformers' `labels=`), so
    under stage 3 the gathered working set is still there around it; a loss computed on the logits
    the model returned (log-probs, pairwise, KL) runs after the forward released its units and before
    the backward gathers them again (seen in the FSDP2 dry run of DPO: no gathered parameters at the
    loss's moments)."""
    g = states.gpu
    params = g.get("parameters", 0.0)
    grads = g.get("gradients", 0.0)
    opt = g.get("optimizer_states", 0.0)
    gathered = g.get("gathered", 0.0)
    accumulating = layout.grad_accum > 1 or layout.pp > 1
    base = {"parameters": params, "buffers": float(buffers), "optimizer_states": opt, "other": float(workspace)}
    kept = acts["activations"] + acts["held"]
    grads_bwd = grads if accumulating else 0.0
    # FSDP2's working set differs by moment (zero.fsdp_moment_gathered, given through `acts`)
    g_loss = acts.get("gathered_loss", gathered)
    g_bwd = acts.get("gathered_backward", gathered)
    at_loss = g_loss if loss_in_model else 0.0
    out = {
        "loss": {**base, "parameters": params + at_loss, "gradients": grads_bwd,
                 "activations": acts["activations"] + acts.get("loss_fwd", 0.0), "temporaries": 0.0},
        "loss backward": {**base, "parameters": params + at_loss, "gradients": grads_bwd,
                          "activations": kept + acts["loss_saved"], "temporaries": acts["loss_temp"]},
        "backward": {**base, "parameters": params + g_bwd, "gradients": grads_bwd, "activations": kept,
                     "temporaries": acts["transient"]},
        "optimizer": {**base, "gradients": grads, "activations": acts["held"], "temporaries": step_temp},
    }
    layers = acts.get("layers", 0.0)
    if layers:
        # the end of the backward: every layer but the last one's gradients are done (sharded, or
        # whole), while few activations are left (FSDP8 + checkpointing peaks here in the dry run)
        done = grads if accumulating else grads * (layers - 1) / layers
        out["end of backward"] = {**base, "parameters": params + g_bwd, "gradients": done,
                                  "activations": acts["end_kept"] + acts["held"], "temporaries": acts["transient"]}
    if not acts.get("loss_fwd"):
        del out["loss"]  # not the last stage (or the megatron model): no head here
    order = ("loss", "loss backward", "backward", "end of backward", "optimizer")  # the step's order
    return {k: out[k] for k in order if k in out}


def _rank_memory(stage: int, states: RankStates, buffers: int, acts: dict[str, float], step_temp: float,
                 workspace: int, gpu: GPUSpec, layout: Layout) -> RankMemory:
    """The larger of three moments: the loss's backward (last stage), a layer's backward with every
    micro-batch in flight, and the optimizer step."""
    moments = rank_moments(states, buffers, acts, step_temp, workspace, layout)
    phase, bd = max(moments.items(), key=lambda x: sum(x[1].values()))
    gathered = bd["parameters"] - states.gpu.get("parameters", 0.0)
    breakdown = {k: int(bd.get(k, 0.0)) for k in ("parameters", "buffers", "gradients", "activations",
                                                   "optimizer_states", "temporaries", "other")}
    total = sum(breakdown.values())
    reserved = reserved_bytes(total, sum(1 for v in breakdown.values() if v))
    details = {"zero3_gathered": int(gathered)} if gathered and phase != "optimizer" else {}
    if acts["held"] or acts["loss_saved"]:
        details["logits"] = int(acts["held"] + (acts["loss_saved"] + acts["loss_temp"] if phase == "loss backward" else 0))
    return RankMemory(stage=stage, peak_allocated_bytes=total, reserved_bytes=reserved,
                      device_bytes=reserved + gpu.cuda_context_bytes, peak_phase=phase, breakdown=breakdown,
                      details=details, cpu_bytes=int(states.cpu_total))
