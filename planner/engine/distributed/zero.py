"""Model states per rank (parameters, gradients, optimizer states) under ZeRO / FSDP and offload.

Three layers, each checked against published figures (tests/test_parallel_zero.py):

1. The ZeRO paper (Rajbhandari et al. 2019, arXiv:1910.02054, Table 1): mixed-precision Adam holds
   2Ψ (fp16 params) + 2Ψ (fp16 grads) + KΨ (fp32 master params, momentum, variance; K = 12):
       stage 0        (2 + 2 + K)Ψ
       P_os     (1)   2Ψ + 2Ψ + KΨ/Nd
       P_os+g   (2)   2Ψ + (2 + K)Ψ/Nd
       P_os+g+p (3)   (2 + 2 + K)Ψ/Nd
2. DeepSpeed's estimators, matching the CURRENT code (deepspeed/runtime/zero/stage_1_and_2.py and
   stage3.py, `estimate_zero{2,3}_model_states_mem_needs`; additional_buffer_factor 1.5):
       ZeRO-2, no offload:   GPU 2P + 18P/N  (18 = 2 fp16 grads + 4 fp32 grads + 4 fp32 params + 8 Adam)
                             CPU 4P x gpus_per_node x 1.5 (every process loads the fp32 model)
       ZeRO-2, offload:      GPU 2P;  CPU P x max(4N, 16) x 1.5
       ZeRO-3, no offload:   GPU 4·LL + 18P/N (LL = largest layer's params: its fp16 params + grads gathered)
                             CPU 4·LL·gpus_per_node·1.5 with zero_init, else 4P·gpus_per_node·1.5
       ZeRO-3, offload opt:  GPU 4·LL + 2P/N; CPU 16P/nodes·1.5 (zero_init) else P·max(4·gpus_per_node, 16/nodes)·1.5
       ZeRO-3, offload both: GPU 4·LL;        CPU 18P/nodes·1.5 (zero_init) else P·max(4·gpus_per_node, 18/nodes)·1.5
   The ZeRO-2 no-offload figure in DeepSpeed's docs (memory.rst: 15.93 GB for 2851M params on 8 GPUs)
   comes from the OLDER formula 4P + 16P/N; `deepspeed_zero2(..., legacy=True)` gives it.
3. Our plans: the rank's share of the model (TP/PP split, shard.py) is priced by the single-GPU engine
   (`resident`, `optimizer_memory`), then partitioned over the DP group by the sharding stage:
       stage >= 1: optimizer states (and master weights) / dp
       stage >= 2: gradients / dp
       stage 3:    parameters (trainable and frozen) / dp, plus the gathered working set
   with one of two semantics:
   - "deepspeed" (zero >= 1): DeepSpeed runs the module in half precision when the plan computes in
     half (bf16, fp16, mixed-*): params 2 B, grads 2 B, an fp32 master copy 4 B, optimizer states in
     fp32, and (current code) an fp32 gradient partition 4 B per trainable parameter. fp32 plans keep
     4 B params and grads, no master. The gathered ZeRO-3 working set is the largest single module's
     params + grads (DeepSpeed gathers module by module): 4·LL bytes as in its estimator.
   - "torch" (zero 0 = DDP, or fsdp): the plan's own dtypes (mixed = fp32 params and states, as
     FSDP's MixedPrecision keeps its sharded fp32 parameters). The FSDP working set is one wrapped
     unit (a decoder layer, or the embedding/head) gathered in the compute dtype, plus its
     unsharded gradients before the reduce-scatter.
   Offload (DeepSpeed ZeRO-Offload / FSDP CPUOffload): "optimizer" moves the optimizer states, the
   master weights and the partitioned gradients (stage >= 2) to CPU; "optimizer+params" also the
   parameter partition (stage 3 only). CPU bytes are reported per rank and per node (x GPUs on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from planner.architecture import ModelSpec
from planner.engine.optimizers import optimizer_memory
from planner.engine.resident import resident
from planner.engine.tape import DTYPE_BYTES
from planner.engine.distributed.layout import Layout
from planner.engine.distributed.shard import rank_spec
from planner.specs import Plan

Semantics = Literal["deepspeed", "torch"]
ZERO_PAPER_K = 12  # fp32 master params, momentum and variance: 4 + 4 + 4 bytes per parameter
DEEPSPEED_BUFFER_FACTOR = 1.5  # additional_buffer_factor default in DeepSpeed's estimators
STAGE_NAMES = {0: "none", 1: "os", 2: "os+g", 3: "os+g+p"}


# ---- 1. the ZeRO paper ---------------------------------------------------------------------------
def zero_paper_bytes(psi: float, nd: int, stage: int, k: float = ZERO_PAPER_K) -> float:
    """Model-state bytes per device, ZeRO paper Table 1 (2Ψ params + 2Ψ grads + KΨ optimizer)."""
    st = partition(StateBytes(params_trainable=2 * psi, grads=2 * psi, optimizer=k * psi), stage, nd)
    return st.gpu_total


# ---- 2. DeepSpeed's estimators ---------------------------------------------------------------------
@dataclass(frozen=True)
class DeepSpeedFigure:
    gpu_bytes: int  # per GPU
    cpu_bytes: int  # per node (DeepSpeed prints it "per CPU")


def deepspeed_zero2(total_params: float, gpus_per_node: int = 1, nodes: int = 1, offload_optimizer: bool = False,
                    buffer_factor: float = DEEPSPEED_BUFFER_FACTOR, legacy: bool = False) -> DeepSpeedFigure:
    """`estimate_zero2_model_states_mem_needs` (current formula; `legacy` = the docs' 4P + 16P/N)."""
    n = gpus_per_node * nodes
    p = total_params
    if offload_optimizer:
        gpu = 2 * p  # fp16 params only
        cpu = p * max(4 * n, 16) * buffer_factor  # fp32 model per process at init, or 16 B/param of states
    else:
        gpu = (4 * p + int(16 * p / n)) if legacy else (2 * p + int(18 * p / n))
        cpu = p * 4 * gpus_per_node * buffer_factor  # each process materialises the fp32 model
    return DeepSpeedFigure(int(gpu), int(cpu))


def deepspeed_zero3(total_params: float, largest_layer_params: float, gpus_per_node: int = 1, nodes: int = 1,
                    offload_optimizer: bool = False, offload_params: bool = False, zero_init: bool = True,
                    buffer_factor: float = DEEPSPEED_BUFFER_FACTOR) -> DeepSpeedFigure:
    """`estimate_zero3_model_states_mem_needs` (stage3.py)."""
    n = gpus_per_node * nodes
    p = total_params
    per_node = 1 / nodes
    gathered = 4 * largest_layer_params  # fp16 params + fp16 grads of the largest module, gathered whole
    if offload_optimizer and offload_params:
        gpu = gathered
        cpu = p * (18 * per_node if zero_init else max(4 * gpus_per_node, 18 * per_node)) * buffer_factor
    elif offload_optimizer:
        gpu = gathered + int(2 * p / n)  # fp16 param partition stays on the GPU
        cpu = p * (16 * per_node if zero_init else max(4 * gpus_per_node, 16 * per_node)) * buffer_factor
    else:
        gpu = gathered + int(18 * p / n)
        cpu = (largest_layer_params if zero_init else p) * 4 * gpus_per_node * buffer_factor
    return DeepSpeedFigure(int(gpu), int(cpu))


# ---- 3. the partitioning core ----------------------------------------------------------------------
@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes one rank would hold without ZeRO (its TP/PP share of the model)."""

    params_trainable: float = 0.0
    params_frozen: float = 0.0  # frozen base weights, quantized weights and their quantization states
    grads: float = 0.0
    optimizer: float = 0.0  # optimizer states, fp32 master weights included
    fp32_grads: float = 0.0  # DeepSpeed's fp32 gradient partition (counted with the optimizer partition)
    gathered: float = 0.0  # stage-3 working set: the largest unit's params (+ grads) gathered whole


@dataclass(frozen=True)
class RankStates:
    """Model states of one rank after partitioning and offload (bytes)."""

    gpu: dict[str, float]  # parameters, gradients, optimizer_states, gathered (stage 3)
    cpu: dict[str, float] = field(default_factory=dict)  # per rank

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())


def partition(s: StateBytes, stage: int, dp: int, offload_optimizer: bool = False,
              offload_params: bool = False) -> RankStates:
    """Partition model states over `dp` ranks by ZeRO stage; move offloaded parts to the CPU."""
    opt = (s.optimizer + s.fp32_grads) / (dp if stage >= 1 else 1)
    grads = s.grads / (dp if stage >= 2 else 1)
    params = (s.params_trainable + s.params_frozen) / (dp if stage >= 3 else 1)
    gpu = {"parameters": params, "gradients": grads, "optimizer_states": opt}
    cpu: dict[str, float] = {}
    if offload_optimizer:
        cpu["optimizer_states"] = gpu.pop("optimizer_states")
        if stage >= 2:
            cpu["gradients"] = gpu.pop("gradients")
    if offload_params:
        cpu["parameters"] = gpu.pop("parameters")
    if stage >= 3 and s.gathered:
        gpu["gathered"] = s.gathered
    return RankStates(gpu={k: v for k, v in gpu.items() if v}, cpu={k: v for k, v in cpu.items() if v})


# ---- 4. our plans ----------------------------------------------------------------------------------
def semantics(layout: Layout) -> Semantics:
    """The layout's engine: DeepSpeed's (by default for ZeRO stages >= 1), torch's (DDP, FSDP)."""
    return layout.engine_name


def engine_description(layout: Layout, plan: Plan) -> str:
    """What the layout's engine keeps per trainable parameter, in its own terms (for the output)."""
    st, dp = layout.stage, layout.dp
    half = plan.compute_dtype if plan.compute_dtype in ("bf16", "fp16") else None
    shard = {0: "", 1: " (optimizer states partitioned)", 2: " (optimizer states and gradients partitioned)",
             3: " (optimizer states, gradients and parameters partitioned)"}[st]
    over = f" over {dp} ranks" if st and dp > 1 else ""
    if semantics(layout) == "deepspeed":
        what = (f"{half} parameters and gradients, fp32 master weights, fp32 gradient buffer and {plan.optimizer} states"
                if half else f"fp32 parameters, gradients and {plan.optimizer} states")
        return f"DeepSpeed ZeRO-{st}: {what}{shard}{over}"
    name = {0: "DDP" if layout.gpus > 1 else "(one GPU)", 1: "DDP + ZeroRedundancyOptimizer"}.get(st) \
        or f"FSDP {layout.fsdp or 'full-shard'}"
    wd = plan.weight_dtype
    what = f"{wd} parameters, gradients and {plan.optimizer} states" + ("" if half is None or wd != half else ", no master copy")
    if plan.precision.startswith("mixed"):
        what += f", {plan.compute_dtype} autocast"
    return f"torch {name}: {what}{shard}{over}"


def plan_states(spec: ModelSpec, plan: Plan, layout: Layout, stage: int = 0) -> StateBytes:
    """Unpartitioned model states of one rank of pipeline stage `stage`: its TP/PP share of `spec`
    priced by the engine's `resident` and `optimizer_memory`, in the layout's semantics (module doc)."""
    part = rank_spec(spec, layout.tp, layout.pp, stage)
    sem = semantics(layout)
    half = plan.compute_dtype if plan.compute_dtype in ("bf16", "fp16") else None
    if sem == "deepspeed" and half:
        # DeepSpeed casts the module to the half dtype (adapters included) and keeps fp32 master
        # weights, fp32 optimizer states and an fp32 gradient partition for the trainable ones.
        res = resident(part, plan.model_copy(update={"precision": half}))
        n = res.trainable_elems
        hb = DTYPE_BYTES[half]
        states = optimizer_memory(plan.optimizer, replace(res, trainable_dtype="fp32"), part.num_layers).state_bytes
        frozen = res.param_bytes - res.grad_bytes + res.quant_state_bytes
        return StateBytes(
            params_trainable=n * hb,
            params_frozen=frozen,
            grads=0 if layout.stage >= 3 else n * hb,  # ZeRO-3 reduces straight into the fp32 partition
            optimizer=4 * n + states,  # fp32 master weights + states
            fp32_grads=4 * n,
            gathered=gathered_bytes(part, plan, sem, half) if layout.stage >= 3 else 0,
        )
    res = resident(part, plan)
    states = optimizer_memory(plan.optimizer, res, part.num_layers).state_bytes
    return StateBytes(
        params_trainable=res.grad_bytes,  # trainable params and their grads share a dtype
        params_frozen=res.param_bytes - res.grad_bytes + res.quant_state_bytes,
        grads=res.grad_bytes,
        optimizer=states,
        gathered=gathered_bytes(part, plan, sem, plan.compute_dtype) if layout.stage >= 3 else 0,
    )


def gathered_bytes(part: ModelSpec, plan: Plan, sem: Semantics, dtype: str, with_grads: bool | None = None) -> float:
    """ZeRO-3 / FSDP working set: what is gathered whole at once.

    deepspeed: module by module; the largest module's params + grads (its estimator's 4·LL bytes in
    half precision; frozen modules need no gradient).
    torch (FSDP, one unit per decoder layer and a root unit with embeddings, final norm and head):
    the unit in compute and the next one prefetched (2 units' params in the compute dtype, the
    MixedPrecision param_dtype) plus the unit's unsharded gradients before the reduce-scatter.
    with_grads: whether the gathered unit's gradients exist too (default: a full fine-tune's do; a
    frozen model's forward, or any no-grad forward, gathers the parameters only)."""
    b = DTYPE_BYTES[dtype]
    b_lin = 0.5 if plan.method == "qlora" else b  # 4-bit weights are gathered packed
    full = plan.method == "full" if with_grads is None else with_grads
    if sem == "deepspeed":
        linears = [lin.in_features * lin.out_features * b_lin for lin in part.layer_linears] if part.num_layers else []
        biggest = max(linears + [part.embedding_params * b, part.lm_head_params * b, part.layer_expert_params * b])
        return biggest * (2 if full else 1)
    layer, root = fsdp_units(part, plan, dtype)
    unit = max(layer, root)
    return 2 * unit + (unit if full else 0)


def fsdp_units(part: ModelSpec, plan: Plan, dtype: str) -> tuple[float, float]:
    """Bytes of FSDP's units as gathered for compute: (one decoder layer, the root: embeddings,
    final norm, head)."""
    b = DTYPE_BYTES[dtype]
    b_lin = 0.5 if plan.method == "qlora" else b  # 4-bit weights are gathered packed
    layer = (part.linear_params_per_layer * b_lin + part.layer_other_params * b) if part.num_layers else 0
    root = (part.embedding_params + part.position_embedding_params + part.lm_head_params + part.final_norm_params
            + part.extra_params) * b
    return float(layer), float(root)


def forward_gathered(part: ModelSpec, plan: Plan, sem: Semantics, dtype: str) -> tuple[float, float]:
    """Stage-3 working set of a no-grad forward (a frozen model's, or a trained model's scoring pass):
    (at the forward's start, while its layers run).

    torch (FSDP2; seen in the fake-PG dry run of DPO's reference, Llama-2-7B at FSDP8, where these
    terms are exact): the root unit stays gathered for the whole forward, and an all-gather's output
    buffer is freed only at the next all-gather's wait; so at the start the root and the first layer
    are there twice, 2(R + U), and afterwards a layer, the next one's buffer and the root, R + 2U.
    deepspeed: the largest module, at both."""
    if sem == "deepspeed":
        g = gathered_bytes(part, plan, sem, dtype, with_grads=False)
        return g, g
    layer, root = fsdp_units(part, plan, dtype)
    return 2 * (root + layer), root + 2 * layer


def rank_model_states(spec: ModelSpec, plan: Plan, layout: Layout, stage: int = 0) -> RankStates:
    """Model states of one rank of pipeline stage `stage` after ZeRO partitioning and offload."""
    st = plan_states(spec, plan, layout, stage)
    return partition(st, layout.stage, layout.dp, layout.offload_optimizer, layout.offload_params)


def frozen_model_states(spec: ModelSpec, setup: Plan, layout: Layout, stage: int = 0) -> RankStates:
    """A frozen model (a reference, teacher or reward model) on one rank of pipeline stage `stage`:
    its TP/PP share of the weights only (no gradients, no optimizer states), partitioned over dp
    when the stage shards parameters (ZeRO-3 / FSDP full-shard; with ZeRO-1/2 the engines replicate
    a model they do not train), offloaded with the parameters; + under stage 3 the unit working set
    its forward gathers (parameters only)."""
    part = rank_spec(spec, layout.tp, layout.pp, stage)
    res = resident(part, setup)
    sem = semantics(layout)
    gathered = max(forward_gathered(part, setup, sem, setup.compute_dtype)) if layout.stage >= 3 else 0.0
    st = StateBytes(params_frozen=res.param_bytes + res.quant_state_bytes, gathered=gathered)
    return partition(st, layout.stage, layout.dp, offload_params=layout.offload_params)


def fsdp_moment_gathered(part: ModelSpec, plan: Plan, layout: Layout) -> dict[str, float]:
    """FSDP2 full-shard (torch semantics, stage 3): what a training step holds gathered at each of the
    estimator's moments, as the fake-PG dry runs of Llama-2-7B at FSDP8 and FSDP4xTP2 show it
    (reports/validation/distributed.md), with U = one decoder layer's unit and R = the root unit in the
    compute dtype and r = reduce-dtype bytes / compute-dtype bytes (2 for mixed precision, whose
    MixedPrecisionPolicy reduces in fp32; else 1):
        gathered_loss      R + U        the root (unsharded until its post-backward) and the last
                                        layer, all-gathered ahead of the backward
        gathered_backward  R + 2U + rU  the root, the layer in backward, the next layer's all-gather
                                        output and the previous layer's reduce-scatter input
    Empty for every other layout (zero.gathered_bytes' single working set applies)."""
    if layout.fsdp != "full-shard" or layout.dp == 1:
        return {}
    layer, root = fsdp_units(part, plan, plan.compute_dtype)
    r = 4 / DTYPE_BYTES[plan.compute_dtype] if plan.precision.startswith("mixed") else 1.0
    return {"gathered_loss": root + layer, "gathered_backward": root + 2 * layer + r * layer}
