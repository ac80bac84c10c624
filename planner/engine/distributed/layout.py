"""How a training step is laid out over GPUs: data, tensor, sequence and pipeline parallelism, ZeRO.

Rank order is Megatron-LM's: tensor-parallel ranks are adjacent (fastest-varying), then data-parallel,
then pipeline stages. So a TP group sits inside a node whenever tp <= gpus_per_node, a DP group strides
by tp, and neighbouring pipeline stages are tp*dp ranks apart.

Batch vocabulary (Megatron's): `micro_batch` sequences per GPU per forward; `dp = gpus / (tp*pp)`;
`grad_accum = global_batch / (micro_batch*dp)` micro-batches per optimizer step, which is also the
number of micro-batches a pipeline runs per step (m).

ZeRO stages follow DeepSpeed (1: optimizer states, 2: + gradients, 3: + parameters partitioned over
the DP group). torch FSDP's `full-shard` is ZeRO-3 and `shard-grad-op` is ZeRO-2 (the sharding
semantics differ in detail: see zero.py). Every error is one line naming the field.

`engine` names the program that holds the model states, because the two keep different bytes for the
same stage number: `deepspeed` (any ZeRO stage, 0 included) runs a half-precision plan's module in
half precision with fp32 master weights, fp32 optimizer states and an fp32 gradient buffer; `torch`
(DDP for stage 0, ZeroRedundancyOptimizer for stage 1, FSDP for 2 and 3) keeps the plan's own
dtypes (a bf16 plan has bf16 AdamW states and no master copy). Default: `deepspeed` when a ZeRO stage
of 1 or more is given, else `torch`. So `--zero 0` and `--zero 1` compare like for like only with the
same `--engine`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from planner.architecture import ModelSpec

Offload = Literal["none", "optimizer", "optimizer+params"]
Engine = Literal["torch", "deepspeed"]
Schedule = Literal["1f1b", "interleaved"]
Fsdp = Literal["full-shard", "shard-grad-op"]

FSDP_STAGE = {"full-shard": 3, "shard-grad-op": 2}
# A node's CPU memory when the user gives none: 2 TB, the system memory of an NVIDIA DGX H100 / H200
# (DGX H100/H200 datasheet), the usual 8-GPU training node.
DEFAULT_CPU_MEMORY_BYTES = 2 * 10**12


class LayoutError(ValueError):
    """A layout that cannot run; the message is one line."""


class Layout(BaseModel):
    """Parallel layout of one training step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: int = Field(default=1, gt=0, le=1 << 24, description="GPUs in the job")
    gpus_per_node: int | None = Field(default=None, gt=0, description="default: min(gpus, 8)")
    zero: int | None = Field(default=None, ge=0, le=3, description="ZeRO stage (default 0, or the fsdp stage)")
    fsdp: Fsdp | None = Field(default=None, description="torch FSDP sharding strategy (ZeRO-3 / ZeRO-2 in torch)")
    engine: Engine | None = Field(default=None, description=(
        "what holds the model states: deepspeed (ZeRO 0-3, fp32 master weights for half-precision plans) or "
        "torch (DDP, ZeroRedundancyOptimizer, FSDP: the plan's dtypes); default deepspeed for --zero >= 1, else torch"))
    cpu_memory: int = Field(default=DEFAULT_CPU_MEMORY_BYTES, gt=0, description=(
        "CPU memory of one node in bytes, which offloaded states must fit (default 2 TB, a DGX H100/H200)"))
    offload: Offload = "none"
    tp: int = Field(default=1, gt=0, description="tensor-parallel degree")
    sp: bool = Field(default=False, description="Megatron sequence parallelism (needs tp > 1)")
    pp: int = Field(default=1, gt=0, description="pipeline stages")
    pp_schedule: Schedule = "1f1b"
    pp_chunks: int = Field(default=1, gt=0, description="model chunks per stage (v) for the interleaved schedule")
    micro_batch: int = Field(default=1, gt=0, description="sequences per GPU per forward")
    global_batch: int | None = Field(default=None, gt=0, description="sequences per optimizer step (default micro_batch*dp)")
    inter_node_gbps: float = Field(default=400.0, gt=0, description="NIC gigabits/s per GPU, each direction")
    inter_node_latency_us: float = Field(default=5.0, ge=0, description="per-hop latency between nodes")
    intra_node_latency_us: float = Field(default=2.0, ge=0, description="per-hop latency inside a node")

    @model_validator(mode="after")
    def _check(self) -> "Layout":
        _validate(self)
        return self

    # ---- derived --------------------------------------------------------------------------------
    @property
    def per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node is not None else min(self.gpus, 8)

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.per_node)

    @property
    def dp(self) -> int:
        """Data-parallel degree = gpus / (tp*pp)."""
        return self.gpus // (self.tp * self.pp)

    @property
    def batch(self) -> int:
        """Global batch (sequences per optimizer step)."""
        return self.global_batch if self.global_batch is not None else self.micro_batch * self.dp

    @property
    def grad_accum(self) -> int:
        """Micro-batches per step per DP rank: global / (micro*dp); the pipeline's m."""
        return self.batch // (self.micro_batch * self.dp)

    @property
    def engine_name(self) -> Engine:
        """The engine that holds the model states (the `engine` field, or its default)."""
        if self.engine is not None:
            return self.engine
        return "deepspeed" if self.fsdp is None and (self.zero or 0) >= 1 else "torch"

    @property
    def stage(self) -> int:
        """Sharding stage: ZeRO stage, or the FSDP strategy's equivalent."""
        if self.zero is not None:
            return self.zero
        return FSDP_STAGE[self.fsdp] if self.fsdp else 0

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline stage (v): pp_chunks with the interleaved schedule, else 1."""
        return self.pp_chunks if self.pp_schedule == "interleaved" else 1

    @property
    def offload_optimizer(self) -> bool:
        return self.offload != "none"

    @property
    def offload_params(self) -> bool:
        return self.offload == "optimizer+params"

    def check_model(self, spec: ModelSpec) -> None:
        """Checks that need the model: TP must divide the heads, KV heads and MLP width (Megatron's
        `ensure_divisibility`; torch TP needs the same), and each pipeline stage (and chunk) needs a layer."""
        t = self.tp
        if spec.num_attention_heads % t:
            raise LayoutError(f"tp: {t} does not divide the {spec.num_attention_heads} attention heads of {spec.id}")
        if spec.num_key_value_heads % t:
            raise LayoutError(f"tp: {t} does not divide the {spec.num_key_value_heads} KV heads of {spec.id}")
        if spec.intermediate_size % t:
            raise LayoutError(f"tp: {t} does not divide the MLP width {spec.intermediate_size} of {spec.id}")
        if self.pp > spec.num_layers:
            raise LayoutError(f"pp: {self.pp} stages exceed the {spec.num_layers} layers of {spec.id}")
        if self.pp * self.chunks > spec.num_layers:
            raise LayoutError(
                f"pp_chunks: pp x pp_chunks = {self.pp * self.chunks} chunks exceed the {spec.num_layers} layers of {spec.id}"
            )


def _validate(x: Layout) -> None:
    if x.zero is not None and x.fsdp is not None:
        raise LayoutError(
            f"fsdp: give --zero (DeepSpeed) or --fsdp (torch FSDP), not both: --fsdp {x.fsdp} is torch's "
            f"ZeRO-{FSDP_STAGE[x.fsdp]}, --zero {x.zero} asks DeepSpeed for its stage {x.zero}")
    if x.fsdp is not None and x.engine == "deepspeed":
        raise LayoutError(f"engine: --fsdp {x.fsdp} is torch FSDP; with --engine deepspeed give --zero {FSDP_STAGE[x.fsdp]}")
    if x.engine == "torch" and (x.zero or 0) >= 2:
        fs = "full-shard" if x.zero == 3 else "shard-grad-op"
        raise LayoutError(
            f"zero: torch shards gradients and parameters with FSDP: give --fsdp {fs} instead of --zero {x.zero} "
            "with --engine torch (or --engine deepspeed)")
    if x.gpus_per_node is not None and x.gpus_per_node > x.gpus:
        raise LayoutError(
            f"gpus_per_node: {x.gpus_per_node} GPUs per node exceed the {x.gpus} GPUs of the job "
            f"(give --gpus-per-node {x.gpus} or fewer, or more --gpus)")
    n = x.per_node
    if x.gpus > n and x.gpus % n:
        raise LayoutError(f"gpus: {x.gpus} GPUs do not fill whole nodes of {n} (gpus_per_node)")
    mp = x.tp * x.pp
    if x.gpus % mp:
        raise LayoutError(f"tp x pp = {x.tp} x {x.pp} = {mp} does not divide the {x.gpus} GPUs")
    if x.sp and x.tp == 1:
        raise LayoutError("sp: sequence parallelism splits along the TP group and needs tp > 1")
    if x.pp_schedule == "interleaved":
        if x.pp == 1:
            raise LayoutError("pp_schedule: the interleaved schedule needs pp > 1")
        if x.pp_chunks < 2:
            raise LayoutError("pp_chunks: the interleaved schedule needs pp_chunks >= 2")
    elif x.pp_chunks != 1:
        raise LayoutError("pp_chunks: model chunks need pp_schedule interleaved")
    per_step = x.micro_batch * x.dp
    if x.global_batch is not None and x.global_batch % per_step:
        raise LayoutError(
            f"global_batch: {x.global_batch} is not divisible by micro_batch x dp = {x.micro_batch} x {x.dp} = {per_step}"
        )
    if x.pp_schedule == "interleaved" and x.grad_accum % x.pp:
        raise LayoutError(
            f"global_batch: the interleaved schedule needs the micro-batches per step ({x.grad_accum}) to be a multiple of pp ({x.pp})"
        )
    if x.offload_params and x.stage != 3:
        raise LayoutError(f"offload: parameters are offloaded only with ZeRO-3 / full-shard (stage is {x.stage})")
    if x.offload_optimizer and x.stage == 0:
        raise LayoutError("offload: offloading the optimizer needs ZeRO stage 1 or more")
    if x.fsdp is not None and x.offload == "optimizer":
        raise LayoutError("offload: torch FSDP offloads parameters with the optimizer (CPUOffload); use optimizer+params")


def make_layout(**fields: object) -> Layout:
    """Layout(**fields), with any validation error as one LayoutError line ('; ' between several)."""
    try:
        return Layout(**fields)  # type: ignore[arg-type]
    except ValidationError as e:
        raise LayoutError(_one_line(e)) from None


def layout_for_plan(batch: int, grad_accum: int = 1, **fields: object) -> Layout:
    """The layout of a plan whose `batch` is sequences per GPU per micro-batch and `grad_accum` the
    micro-batches per step (the CLI's --batch/--grad-accum): global batch = batch x grad_accum x dp."""
    fields.pop("global_batch", None)
    gpus, tp, pp = fields.get("gpus", 1), fields.get("tp", 1), fields.get("pp", 1)
    ok = all(isinstance(x, int) and x > 0 for x in (gpus, tp, pp)) and gpus % (tp * pp) == 0  # type: ignore[operator]
    dp = gpus // (tp * pp) if ok else 1  # type: ignore[operator]  # else the Layout names the error
    return make_layout(micro_batch=batch, global_batch=batch * grad_accum * dp, **fields)


def _one_line(e: ValidationError) -> str:
    parts: list[str] = []
    for err in e.errors():
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        loc = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
        line = msg if not loc or msg.startswith(f"{loc[0]}:") else f"{loc[0]}: {msg} (got {err.get('input')!r})"
        if line not in parts:
            parts.append(line)
    return "; ".join(parts) if parts else " ".join(str(e).split())
