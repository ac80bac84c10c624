"""Distributed estimates of the multi-model techniques (rm, dpo, distill, grpo, ppo, and any plugin's):
`estimate_technique(plan, layout, spec, gpu)`, called by `estimate_distributed` for every task but sft.

The technique's `Workload` says what runs: models with roles (trainable or frozen) and phases
(`train_step`, `score`, `forward`, `generate`). Every rank runs every phase on its data-parallel share
(the plan's batch is per GPU), with every model laid out the same way (data-parallel over dp, split by
TP). Nothing here depends on a technique's name.

Memory of a rank, phase by phase (the busiest moment over the phases is the rank's peak):
    resident states   every model on the GPU in that phase (`frozen_placement` as the single-GPU
                      engine has it: `resident` all the step; `offload` a frozen model only in its
                      own phases; `separate` frozen models on other GPUs, so their phases are not this
                      rank's memory). Trainable: zero.rank_model_states (ZeRO/FSDP partitioning of
                      parameters, gradients, optimizer states; LoRA: frozen base + adapters; gradients
                      only inside the training phase, or all step long under gradient accumulation).
                      Frozen: zero.frozen_model_states (weights only, TP share, / dp when the stage
                      shards parameters, i.e. ZeRO-3 / FSDP full-shard).
    train_step        the sft moments (estimate.rank_moments: the head's forward, the loss's backward,
                      a layer's backward, the end of the backward, the optimizer step) of the trained
                      model with the phase's rows x seq and its loss program: the engine's own head
                      (planner.engine.heads: causal_lm, logprobs, pairwise, kl, fused, ...) replayed on
                      the rank's vocab-parallel share, so every batch x seq x vocab tensor divides by t.
                      Under FSDP full-shard the gathered units per moment (zero.fsdp_moment_gathered);
                      a loss computed on the returned logits (every head but causal_lm) runs with no
                      unit gathered. `passes` forwards before one backward keep every pass's graph
                      (first order: the transients of one pass).
    score / forward   the single-GPU engine's compiled program for the phase (its loss, fused-head
                      tiles, adapters on or off) replayed on the rank's TP share (heads/t, MLP/t, vocab/t
                      logits and their fp32 copies); under stage 3 the gathered units
                      (zero.forward_gathered: FSDP2 2(R + U) at the forward's start, R + 2U while the
                      layers run; none at a score's log-softmax, which runs after the model returned)
    during            a phase run while a training phase's forward graph is alive (DPO's reference
                      after the policy's forward, TRL's order) also holds that graph: the layers' and the
                      head's saved tensors and the outputs the program binds
    generate          the engine's generation timeline (planner.engine.generation) on the rank's share:
                      the KV cache holds KV heads / t; prefill and the last decode step; under stage 3
                      the layers' working set gathered
    carried           tensors an earlier phase made and this one still references (a teacher's logits
                      in the student's step): `Phase.carried` bytes per token / t (they are logits,
                      vocab-parallel, in every built-in technique).
    runtime           cuBLAS workspaces: two threads in a training phase, one otherwise.

Step time, phase by phase (each repeated for every micro-batch of the step):
    train_step        as sft: forward + backward + recompute, optimizer step, TP all-reduces exposed,
                      ZeRO / FSDP all-gathers and reduce-scatters overlapped with their compute window
    score / forward   the forward; TP all-reduces exposed; under stage 3 the parameters all-gathered
                      (frozen models too), overlapped with the forward
    generate          prefill (compute-bound) + each decode step: max(weights and KV cache read from
                      HBM, its FLOPs) + its TP all-reduces (latency-bound, exposed); under stage 3 each
                      decode step all-gathers every parameter again (what `generate` on a ZeRO-3 /
                      FSDP-wrapped model does), overlapped with that step's compute only
    offload           a frozen model's weights copied to the GPU before each of its phases (exposed)
tokens/s = tokens of the training and generation phases x dp x micro-batches / step time (as the
single-GPU figure counts them); MFU counts forward-only FLOPs for no-grad phases.

Not modelled: pipeline and sequence parallelism for these techniques (refused), TRL's gathering of the
whole ZeRO-3 policy for generation (`ds3_gather_for_generation`), vLLM rollouts, NCCL buffers.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

from planner.architecture import ModelSpec
from planner.engine.optimizers import optimizer_memory
from planner.engine.resident import Resident, lora_targets, resident
from planner.engine.runtime import cublas_workspace_bytes, reserved_bytes
from planner.engine.tape import DTYPE_BYTES
from planner.gpus import GPUSpec
from planner.engine import compute
from planner.engine.distributed import comm
from planner.engine.distributed.ranks import (_profile, ActivationModel, CollectiveReport, DistributedEstimate, RankMemory, StepTime,
                                       _activations, _collectives, _exposed, _param_bytes_compute, _part_targets,
                                       optimizer_seconds, rank_moments)
from planner.engine.distributed.layout import Layout, LayoutError
from planner.engine.distributed.shard import rank_spec
from planner.engine.distributed.zero import (RankStates, engine_description, forward_gathered, frozen_model_states, fsdp_moment_gathered,
                                   rank_model_states, semantics)
from planner.engine.timing import train_micro_batch
from planner.specs import Plan
from planner.workload import ModelUse, Phase, Workload

# transformers computes a loss inside the model's forward only for `labels=` (its causal-LM loss); every
# other head (log-probs, pairwise, KL) runs on the logits or scores the model returned
LOSS_IN_MODEL = frozenset({"causal_lm"})
CATS = ("parameters", "buffers", "gradients", "activations", "optimizer_states", "temporaries", "kv_cache", "other")


@dataclass(frozen=True)
class _Model:
    """One model of the workload on one rank."""

    use: ModelUse
    part: ModelSpec  # its TP share
    res: Resident  # of the share
    states: RankStates

    @property
    def frozen(self) -> bool:
        return not self.use.trainable


def _models(workload: Workload, layout: Layout) -> dict[str, _Model]:
    out = {}
    for use in workload.models:
        layout.check_model(use.spec)
        part = rank_spec(use.spec, layout.tp, 1, 0)
        states = (rank_model_states(use.spec, use.setup, layout) if use.trainable
                  else frozen_model_states(use.spec, use.setup, layout))
        out[use.role] = _Model(use, part, resident(part, use.setup), states)
    return out


def _resident_roles(workload: Workload, ph: Phase, placement: str, models: dict[str, _Model]) -> list[str]:
    """Models on this rank's GPU during `ph` (the single-GPU engine's rule)."""
    return [r for r, m in models.items()
            if r == ph.role or not m.frozen or placement == "resident"]


def _idle_states(m: _Model, accumulating: bool) -> dict[str, float]:
    """A model's states while it is not training: weights (and, trainable, optimizer states; gradients
    only while they accumulate over micro-batches)."""
    g = m.states.gpu
    return {"parameters": g.get("parameters", 0.0), "buffers": float(m.res.buffer_bytes),
            "optimizer_states": g.get("optimizer_states", 0.0),
            "gradients": g.get("gradients", 0.0) if accumulating else 0.0}


def _add(into: dict[str, float], more: dict[str, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v


# ---- the engine's no-grad timelines on a rank's share --------------------------------------------
def _timeline(ph: Phase, m: _Model) -> tuple:
    """(compiled timeline, resident, extra) of the phase's score / forward / generate program on the
    rank's share, compiled (and cached) by the single-GPU engine as it compiles the phase (its loss,
    fused-head tiles, adapters on or off, passes, and whether it runs under the plan's autocast)."""
    from planner.engine.estimate import compile_phase

    return compile_phase(ph, ModelUse(m.use.role, m.part, m.use.setup, m.use.trainable, m.use.ref))


def _no_grad_moments(ph: Phase, m: _Model, layout: Layout) -> dict[str, dict[str, float]]:
    """Activations (and KV cache), and the stage-3 gathered parameters, of the phase's program beyond
    the model's own weights, per moment: `forward` (inside the model; for a score its log-softmax
    moment `score` runs after the model returned, with nothing gathered) and for generation
    `prefill` and `decode`."""
    from planner.engine import generation
    from planner.engine.evaluate import finish

    timeline, res, extra = _timeline(ph, m)
    base = res.param_bytes + res.buffer_bytes + res.quant_state_bytes
    start = during = 0.0
    if layout.stage >= 3:
        start, during = forward_gathered(m.part, m.use.setup, semantics(layout), m.use.setup.compute_dtype)
    if ph.kind == "generate":
        mem = generation.evaluate(timeline, res, extra, ph.batch, ph.seq, ph.new_tokens, m.part, m.use.setup, 0, 0)
        out = {}
        for name in ("prefill", "decode"):
            v = mem.phases.get(name)
            if v is None:
                continue
            kv = generation.kv_bytes_per_token(m.part, res.non_linear_dtype) * ph.batch * (
                ph.seq if name == "prefill" else ph.seq + ph.new_tokens - 1)
            # every decode step is a forward too: the working set is gathered again
            out[name] = {"kv_cache": float(kv), "activations": float(v - base - kv), "parameters": during}
        return out
    phases = finish(timeline, extra, ph.batch * ph.seq, ph.seq, 0, 0).phases
    fwd = float(phases["forward"] - base)
    out = {"forward": {"activations": fwd, "parameters": during}}
    if start > during:  # the forward's start: twice the first units, hardly any activations yet
        out["forward start"] = {"activations": 0.0, "parameters": start}
    if "score" in phases:
        out["score"] = {"activations": float(phases["score"] - base)}
    return out


# ---- time ---------------------------------------------------------------------------------------------
def _kw(m: _Model, gpu: GPUSpec, layout: Layout, eff: compute.Efficiency, style: compute.Style) -> dict:
    setup = m.use.setup
    targets = lora_targets(m.use.spec, setup) if setup.method != "full" else []
    return dict(dtype=setup.compute_dtype, method=setup.method, lora_rank=setup.lora_rank,
                lora_targets=_part_targets(m.part, targets), flash=setup.attn == "sdpa", style=style,
                tp=layout.tp, eff=eff)


def _tp_forward(m: _Model, layout: Layout, topo: comm.Topology, rows: int, tokens_per_row: int, count: int,
                name: str) -> list[comm.Collective]:
    """Megatron TP in a forward: two all-reduces per layer + the vocab-parallel embedding and head."""
    if layout.tp == 1:
        return []
    act_bytes = rows * tokens_per_row * m.use.spec.hidden_size * DTYPE_BYTES[m.use.setup.compute_dtype]
    calls = (2 * m.part.num_layers + 2) * count
    return [comm.collective(f"tp all-reduce ({name})", "all-reduce", comm.groups(layout)["tp"], act_bytes, calls,
                            topo)]


def _gather(m: _Model, layout: Layout, topo: comm.Topology, count: int, name: str) -> list[comm.Collective]:
    """Under stage 3 a forward all-gathers the model's parameters (as gathered for compute)."""
    if layout.stage < 3 or layout.dp == 1:
        return []
    full = _param_bytes_compute(m.part, m.use.setup, m.res)
    return [comm.collective(f"param all-gather ({name})", "all-gather", comm.groups(layout)["dp"], full, count,
                            topo, "forward")]


@dataclass
class _PhaseTime:
    compute_s: float
    items: list[comm.Collective]
    exposed: list[float]
    optimizer_s: float = 0.0
    model_flops: float = 0.0
    hardware_flops: float = 0.0

    @property
    def total(self) -> float:
        return self.compute_s + sum(self.exposed)


def _phase_time(ph: Phase, m: _Model, layout: Layout, gpu: GPUSpec, topo: comm.Topology, eff: compute.Efficiency,
                style: compute.Style) -> _PhaseTime:
    mb = layout.grad_accum  # every phase runs once per micro-batch
    setup, spec = m.use.setup, m.use.spec
    kw = _kw(m, gpu, layout, eff, style)
    whole_rows = ph.batch * layout.dp * mb
    targets = lora_targets(spec, setup) if setup.method != "full" else []
    fl = dict(method=setup.method, lora_rank=setup.lora_rank, lora_targets=targets, causal=setup.attn == "sdpa")
    profile = _profile(gpu, style)
    if ph.kind == "train_step":
        if profile is not None:  # the rank's share of the replayed program, op by op
            fwd_s, bwd_s = train_micro_batch(m.part, setup, profile, ph.batch, ph.seq, loss=ph.loss,
                                             passes=ph.passes, loss_ops=ph.loss_ops)
            t = compute.MicroBatchTime(fwd_s, bwd_s, 0.0)
        else:
            t = compute.micro_batch_time(m.part, ph.batch * ph.seq, ph.seq, gpu, grad_ckpt=setup.grad_ckpt, sp=False,
                                         **kw)
        items = _collectives(spec, setup, layout, topo, 0, m.states, m.res.trainable_elems, m.res.trainable_dtype,
                             _param_bytes_compute(m.part, setup, m.res), rows=ph.batch, seq=ph.seq)
        exposed = _exposed(items, t.forward, t.backward + t.recompute)
        opt_s = optimizer_seconds(setup, layout, m.res.trainable_elems, gpu, eff)
        f = compute.micro_batch_flops(spec, whole_rows * ph.seq, ph.seq, grad_ckpt=setup.grad_ckpt, **fl)
        return _PhaseTime(mb * t.total + opt_s, items, exposed, opt_s, f.model, f.hardware)
    if ph.kind in ("score", "forward"):
        fwd = (_rank_phase(ph, m, profile).total_s if profile is not None
               else compute.micro_batch_time(m.part, ph.batch * ph.seq, ph.seq, gpu, **kw).forward)
        items = _tp_forward(m, layout, topo, ph.batch, ph.seq, mb, ph.name) + _gather(m, layout, topo, mb, ph.name)
        f = compute.micro_batch_flops(spec, whole_rows * ph.seq, ph.seq, **fl).forward
        return _PhaseTime(mb * fwd, items, _exposed(items, fwd, 0.0), 0.0, f, f)
    if ph.kind == "generate":
        from planner.engine.generation import kv_bytes_per_token

        prefill = compute.micro_batch_time(m.part, ph.batch * ph.seq, ph.seq, gpu, **kw).forward
        steps = max(ph.new_tokens - 1, 0)
        if profile is not None:  # generate() on the rank's share, op by op: prefill, then the decode steps
            pt = _rank_phase(ph, m, profile)
            prefill = pt.total_s * pt.parts.get("prefill", 0.0) / max(sum(pt.parts.values()), 1e-30)
        mean_len = ph.seq + ph.new_tokens / 2
        bw = (gpu.mem_bandwidth_gb_per_s or 1000.0) * 1e9 * eff.memory * eff.software
        read = m.res.param_bytes + m.res.quant_state_bytes + \
            kv_bytes_per_token(m.part, m.res.non_linear_dtype) * ph.batch * mean_len
        step_compute = compute.micro_batch_time(m.part, ph.batch, int(mean_len), gpu, causal=False, **kw).forward
        decode_step = max(read / bw, step_compute)
        if profile is not None and steps:
            decode_step = (pt.total_s - prefill) / steps
        pre_items = _tp_forward(m, layout, topo, ph.batch, ph.seq, mb, "prefill") + _gather(m, layout, topo, mb,
                                                                                            "prefill")
        dec_items = (_tp_forward(m, layout, topo, ph.batch, 1, mb * steps, "decode")
                     + _gather(m, layout, topo, mb * steps, "decode, every token"))
        exposed = _exposed(pre_items, prefill, 0.0) + _exposed(dec_items, decode_step, 0.0)
        f = (compute.micro_batch_flops(spec, whole_rows * ph.seq, ph.seq, **fl).forward
             + compute.micro_batch_flops(spec, whole_rows * steps, int(mean_len), **{**fl, "causal": False}).forward)
        return _PhaseTime(mb * (prefill + steps * decode_step), pre_items + dec_items, exposed, 0.0, f, f)
    raise LayoutError(f"task: phase '{ph.name}' is a '{ph.kind}' program, which the distributed estimate "
                      "does not model")


def _rank_phase(ph: Phase, m: "_Model", profile):
    """planner.engine.timing.phase_time of one phase run by the rank's share of its model."""
    from planner.engine.timing import phase_time
    from planner.workload import ModelUse, Workload

    use = ModelUse(m.use.role, m.part, m.use.setup, trainable=m.use.trainable, ref=m.use.ref)
    return phase_time(ph, Workload(technique="rank", models=(use,), phases=(ph,)), profile)


# ---- the estimate ----------------------------------------------------------------------------------
def estimate_technique(plan: Plan, layout: Layout, spec: ModelSpec, gpu: GPUSpec, *,
                       activations: ActivationModel = "engine", style: compute.Style = "hf",
                       eff: compute.Efficiency | None = None) -> DistributedEstimate:
    """Busiest-rank memory per phase, collectives and step time of `plan.task`'s workload on `layout`."""
    from planner.engine.timing import tokens_per_step
    from planner.plugins import technique

    if plan.task == "generate":
        raise LayoutError("task: distributed estimates cover training steps (sft and the training techniques), "
                          "not generate; see planner serve for inference")
    if layout.pp > 1:
        raise LayoutError(f"pp: pipeline parallelism is estimated for sft only, not {plan.task}")
    if layout.sp:
        raise LayoutError(f"sp: sequence parallelism is estimated for sft only, not {plan.task}")
    workload = technique(plan.task).workload(plan, spec)
    # the layout runs its grad_accum micro-batches itself (below): each phase priced once per micro-batch
    workload = dataclasses.replace(workload, phases=tuple(dataclasses.replace(ph, micro_batches=1)
                                                          for ph in workload.phases))
    models = _models(workload, layout)
    placement = getattr(plan, "frozen_placement", "resident")
    accumulating = layout.grad_accum > 1
    eff = eff or compute.efficiency(gpu)
    topo = comm.topology(layout, gpu)
    cc = gpu.compute_capability

    moments: dict[str, dict[str, float]] = {}
    gathered_at: dict[str, float] = {}
    resident_in: dict[str, list[str]] = {}
    phase_s: dict[str, float] = {}
    reports: list[CollectiveReport] = []
    compute_s = exposed_s = optimizer_s = model_flops = hardware_flops = 0.0
    offload_items: list[comm.Collective] = []
    for ph in workload.phases:
        m = models[ph.role]
        pt = _phase_time(ph, m, layout, gpu, topo, eff, style)
        if placement == "offload" and m.frozen:  # its weights come back to the GPU before its phase
            offload_items.append(comm.collective(f"{ph.name}: {ph.role} weights to the GPU (offload)", "host-copy",
                                                 comm.Group("host", 1, 1), m.states.gpu.get("parameters", 0.0),
                                                 layout.grad_accum, topo))
        phase_s[ph.name] = pt.total
        compute_s += pt.compute_s
        exposed_s += sum(pt.exposed)
        optimizer_s += pt.optimizer_s
        model_flops += pt.model_flops
        hardware_flops += pt.hardware_flops
        reports += [CollectiveReport(name=f"{ph.name}: {c.name}", kind=c.kind, group=c.group, group_size=c.group_size,
                                     count=c.count, tensor_bytes=c.tensor_bytes, bytes_per_rank=c.bytes_per_rank,
                                     time_s=c.time_s, exposed_s=x, overlapped=c.overlapped, link=c.link)
                    for c, x in zip(pt.items, pt.exposed)]
        if placement == "separate" and m.frozen:
            continue  # runs on other GPUs: no memory of this rank (its time still delays the step)
        roles = _resident_roles(workload, ph, placement, models)
        resident_in[ph.name] = roles
        idle: dict[str, float] = {}
        for r in roles:
            if r != ph.role or ph.kind != "train_step":
                _add(idle, _idle_states(models[r], accumulating))
        carried = ph.carried * ph.batch * ph.seq / layout.tp
        during = getattr(ph, "during", None)
        if during is not None:  # another phase's forward graph is alive while this one runs
            host = next(h for h in workload.phases if h.name == during)
            carried += _graph_after_forward(host, models[host.role], layout, activations)
        if ph.kind == "train_step":
            for name, bd in _train_moments(ph, m, layout, activations, cc).items():
                bd = dict(bd)
                _add(bd, idle)
                bd["activations"] = bd.get("activations", 0.0) + carried
                moments[f"{ph.name}.{name}"] = bd
                gathered_at[f"{ph.name}.{name}"] = bd["parameters"] - idle.get("parameters", 0.0) - \
                    m.states.gpu.get("parameters", 0.0)
        else:
            for name, extra in _no_grad_moments(ph, m, layout).items():
                bd = dict(idle)
                gathered_at[f"{ph.name}.{name}"] = extra.get("parameters", 0.0)
                _add(bd, extra)
                bd["activations"] = bd.get("activations", 0.0) + carried
                bd["other"] = float(cublas_workspace_bytes(cc, 1))
                moments[f"{ph.name}.{name}"] = bd
    if not moments:
        raise LayoutError(f"frozen_placement: every phase of {plan.task} runs on other GPUs")
    off_exposed = sum(c.time_s for c in offload_items)
    reports += [CollectiveReport(name=c.name, kind=c.kind, group=c.group, group_size=c.group_size, count=c.count,
                                 tensor_bytes=c.tensor_bytes, bytes_per_rank=c.bytes_per_rank, time_s=c.time_s,
                                 exposed_s=c.time_s, overlapped=False, link=c.link) for c in offload_items]
    exposed_s += off_exposed
    total_s = compute_s + exposed_s

    peak_name, peak_bd = max(moments.items(), key=lambda x: sum(x[1].values()))
    breakdown = {k: int(peak_bd.get(k, 0.0)) for k in CATS if peak_bd.get(k, 0.0) or k in (
        "parameters", "buffers", "gradients", "activations", "optimizer_states", "temporaries", "other")}
    total = sum(breakdown.values())
    reserved = reserved_bytes(total, sum(1 for v in breakdown.values() if v))
    details = {f"{r}.states": int(sum(models[r].states.gpu.values()) - models[r].states.gpu.get("gathered", 0.0))
               for r in resident_in.get(peak_name.split(".", 1)[0], [])}
    if gathered_at.get(peak_name):
        details["zero3_gathered"] = int(gathered_at[peak_name])
    cpu = sum(m.states.cpu_total for m in models.values())
    memory = RankMemory(stage=0, peak_allocated_bytes=total, reserved_bytes=reserved,
                        device_bytes=reserved + gpu.cuda_context_bytes, peak_phase=peak_name, breakdown=breakdown,
                        details=details, cpu_bytes=int(cpu))
    tokens = tokens_per_step(workload) * layout.dp * layout.grad_accum
    from planner.engine.timing import peak_flops

    peak = peak_flops(workload, gpu)
    phase_s = {k: v + sum(c.time_s for c in offload_items if c.name.startswith(f"{k}: ")) for k, v in phase_s.items()}
    return DistributedEstimate(
        layout=layout, semantics=semantics(layout), memory=memory, stages=[memory],
        cpu_bytes_per_node=int(cpu) * min(layout.gpus, layout.per_node), gpu_memory_bytes=gpu.memory_bytes,
        cpu_memory_bytes=layout.cpu_memory, engine=engine_description(layout, plan),
        fits=(memory.device_bytes <= gpu.memory_bytes
              and int(cpu) * min(layout.gpus, layout.per_node) <= layout.cpu_memory),
        collectives=reports,
        time=StepTime(compute_s=compute_s, exposed_comm_s=exposed_s, bubble_s=0.0, total_s=total_s,
                      optimizer_s=optimizer_s, micro_batch_s=total_s / layout.grad_accum),
        model_flops=model_flops, hardware_flops=hardware_flops, tokens_per_s=tokens / total_s,
        mfu=compute.mfu(model_flops, total_s, layout.gpus, peak),
        tflops_per_gpu=hardware_flops / (total_s * layout.gpus) / 1e12,
        efficiency={"matmul": eff.matmul, "memory": eff.memory, "software": eff.software, "source": eff.source},
        technique=plan.task, phases={k: int(sum(v.values())) for k, v in moments.items()}, phase_seconds=phase_s,
        resident=resident_in, model_states={r: dict(m.states.gpu) for r, m in models.items()},
    )


def _train_acts(ph: Phase, m: _Model, layout: Layout, activations: ActivationModel) -> dict[str, float]:
    """estimate._activations of the trained model in this phase (its rows, seq and loss program).
    With `passes` forwards before one backward every earlier forward's graph and bound outputs stay:
    what the layers and the head keep, and what the program holds, count `passes` times (first
    order: the transients are one pass's)."""
    setup = m.use.setup
    # FSDP's MixedPrecisionPolicy hands the modules half-precision weights and runs no autocast
    act_plan = (setup.model_copy(update={"precision": setup.compute_dtype})
                if layout.fsdp and setup.precision.startswith("mixed") else setup)
    acts = {**_activations(m.use.spec, act_plan, layout, 0, activations, rows=ph.batch, seq=ph.seq, loss=ph.loss),
            **fsdp_moment_gathered(m.part, setup, layout)}
    if ph.passes > 1:
        for k in ("activations", "loss_saved", "held"):
            acts[k] *= ph.passes
    return acts


def _graph_after_forward(ph: Phase, m: _Model, layout: Layout, activations: ActivationModel) -> float:
    """What a train_step phase's forward leaves alive until its backward: the layers' and the head's
    saved tensors and the outputs the program binds (a reference scored `during` it sees them)."""
    acts = _train_acts(ph, m, layout, activations)
    return acts["activations"] + acts["loss_saved"] + acts["held"]


def _train_moments(ph: Phase, m: _Model, layout: Layout, activations: ActivationModel,
                   cc: str) -> dict[str, dict[str, float]]:
    """The sft moments of the trained model in this phase."""
    setup = m.use.setup
    acts = _train_acts(ph, m, layout, activations)
    opt = optimizer_memory(setup.optimizer, m.res, m.part.num_layers)
    temp = 0.0
    if not layout.offload_optimizer and semantics(layout) == "torch":
        temp = opt.step_temp_bytes / (layout.dp if layout.stage >= 1 else 1)
    return rank_moments(m.states, m.res.buffer_bytes, acts, temp, cublas_workspace_bytes(cc, 2), layout,
                        loss_in_model=ph.loss in LOSS_IN_MODEL)
