"""The one answer document of `planner fit --json`, for one GPU and many alike.

A single-GPU plan is a layout of one: the same top-level keys, the same `memory` and `time` blocks.
A plan on many GPUs adds `collectives`, `cpu_memory` and `stages` (and `model_states`); a single-GPU
document leaves them out. `planner fit --json-schema` prints this module's JSON schema, and
docs/json.md publishes it (tests check both kinds of output against it).

Units: bytes, seconds, FLOPs (not TFLOP), tokens per second. Nullable fields are null where the
figure does not apply (time on a card without FLOP/s figures, limits of a plan that does not fit).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 3  # 1: the two documents before the layout issue; 2: one for one GPU and many (CHANGELOG.md)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GPUDoc(_Doc):
    id: str
    name: str
    memory_bytes: int = Field(description="what the CUDA runtime reports as total: what device_bytes must fit")


class ModelDoc(_Doc):
    id: str
    name: str
    num_params: int | None = None
    max_position_embeddings: int | None = None


class LayoutDoc(_Doc):
    """How the step is laid out; one GPU is gpus = dp = tp = pp = 1, stage 0."""

    gpus: int
    gpus_per_node: int
    nodes: int
    dp: int
    tp: int
    pp: int
    sp: bool
    stage: int = Field(description="sharding stage: the ZeRO stage, or FSDP's equivalent (full-shard 3, shard-grad-op 2)")
    zero: int | None
    fsdp: str | None
    engine: str = Field(description="what holds the model states: torch or deepspeed")
    offload: str
    micro_batch: int = Field(description="sequences per GPU per forward")
    grad_accum: int = Field(description="micro-batches per optimizer step")
    global_batch: int = Field(description="sequences per optimizer step over the job")
    pp_schedule: str
    pp_chunks: int


class MemoryDoc(_Doc):
    """The busiest rank's memory of one step (one GPU: that GPU's)."""

    peak_allocated_bytes: int = Field(description="torch.cuda.max_memory_allocated of a steady-state step")
    reserved_bytes: int = Field(description="max_memory_reserved: the caching allocator simulated over the step's allocation trace (allocator.simulated), else peak allocated plus the estimate's rounding model")
    device_bytes: int = Field(description="plus CUDA context and workspaces: what must fit the card")
    peak_phase: str
    stage: int = Field(description="the pipeline stage of the busiest rank (0 without pipeline parallelism)")
    breakdown: dict[str, int] = Field(description="bytes per MemTracker category at the peak; sums to peak_allocated_bytes")
    details: dict[str, int]
    device_items: dict[str, int] = Field(description="what device_bytes adds beyond the allocator")
    outside_allocator: dict[str, int] = Field(description="memory the step uses outside the allocator (paged states)")
    phases: dict[str, int] = Field(description="peak allocated bytes of each phase (or moment) of the step")


class PhaseTimeDoc(_Doc):
    """One phase of the step: its time split, and the device seconds of each part of its program."""

    step_s: float
    compute_s: float = Field(description="device time of the phase's kernels")
    host_s: float = Field(description="host overhead the device waited for")
    exposed_comm_s: float
    bubble_s: float
    parts_compute_s: dict[str, float] = Field(description="device seconds per part (forward, backward, decode...)")


class TimeDoc(_Doc):
    """One step (all phases of a technique's step; for generate one whole generate call)."""

    step_s: float | None = Field(description="seconds of one step: compute_s + host_s + exposed_comm_s + bubble_s")
    phases_s: dict[str, float] = Field(description="seconds of each phase of the step")
    compute_s: float | None = Field(description="device time of the step's kernels on the slowest rank")
    host_s: float | None = Field(description="host overhead not hidden behind device work (null: not modelled)")
    exposed_comm_s: float | None = Field(description="communication not hidden behind compute")
    bubble_s: float | None = Field(description="pipeline bubble")
    optimizer_s: float | None = Field(description="the optimizer step, part of compute_s (null: not split out)")
    tokens_per_step: int
    tokens_counted: str = Field(description="what tokens_per_step and tokens_per_s count")
    tokens_per_s: float | None
    model_flops: float | None = Field(description="FLOPs of one step over the job, without recompute")
    hardware_flops: float | None = Field(description="FLOPs of one step over the job, recompute included")
    mfu: float | None = Field(description="model FLOPs / (step_s x GPUs x peak FLOP/s)")
    hfu: float | None = Field(description="hardware FLOPs / (step_s x GPUs x peak FLOP/s)")
    tflops_per_gpu: float | None = Field(description="hardware TFLOP/s achieved per GPU")
    flops_convention: str
    time_model: str = Field(description="how the time was estimated, and with which efficiency figures")
    phases: dict[str, PhaseTimeDoc] = Field(default_factory=dict, description="the split per phase of the step")


class SuggestionDoc(_Doc):
    change: str
    peak_allocated_bytes: int
    device_bytes: int = Field(description="what must fit the card: reserved plus the CUDA context (for an "
                                          "--alloc-conf setting: the smallest card the step runs in with it)")
    fits: bool
    simulated: bool = Field(default=False, description="device_bytes and fits from the simulated caching allocator "
                                                       "(false: from the estimate's reserved, scaled by the plan's "
                                                       "simulated-to-estimated ratio)")


class AllocatorSettingDoc(_Doc):
    """Caching-allocator settings under which the step fits the card (the same trace replayed)."""

    alloc_conf: str = Field(description="PYTORCH_CUDA_ALLOC_CONF syntax")
    reserved_bytes: int
    min_capacity_bytes: int
    fragmentation_bytes: int


class AllocatorDoc(_Doc):
    """PyTorch's caching allocator simulated over the step's allocation trace, from the engine's own
    replay (docs/allocator.md): what decides `memory.reserved_bytes` and `fits` when `simulated`."""

    simulated: bool = Field(description="false: the engine cannot trace this plan yet (see not_simulated); "
                                        "reserved is the estimate's rounding model and fits is device_bytes <= memory")
    not_simulated: str | None = Field(description="why the step was not simulated, when it was not")
    alloc_conf: str = Field(description="the settings simulated, PYTORCH_CUDA_ALLOC_CONF syntax ('' = defaults)")
    capacity_bytes: int | None = Field(description="what the allocator may take on this card: its memory less the "
                                                   "CUDA context")
    events: int | None = Field(description="allocations, frees and markers in the simulated trace")
    reserved_bytes: int | None = Field(description="the simulation's max_memory_reserved on an unlimited card")
    peak_allocated_bytes: int | None = Field(description="the simulation's max_memory_allocated (block sizes: "
                                                         "512-byte rounding and unsplit slack included)")
    fits: bool | None = Field(description="the trace runs under capacity_bytes (after the allocator's free-and-retry)")
    oom_request_bytes: int | None = Field(description="where it does not fit: the request that fails")
    num_alloc_retries: int | None = Field(description="free-and-retries on this card (releases of cached segments)")
    min_capacity_bytes: int | None = Field(description="the least allocator memory the trace runs under (bisection "
                                                       "to 2 MiB)")
    min_card_bytes: int | None = Field(description="min_capacity_bytes plus the CUDA context: the smallest card")
    fragmentation_bytes: int | None = Field(description="min_capacity_bytes less the simulated allocated peak")
    segments: int | None = Field(description="cudaMalloc segments on an unlimited card")
    settings_that_fit: list[AllocatorSettingDoc] = Field(
        description="where it does not fit: settings under which the same trace fits this card")


class LimitsDoc(_Doc):
    max_batch: int | None = Field(description="the largest micro-batch per GPU that fits")
    max_lengths: dict[str, int] = Field(description="the longest seq / prompt_len / new_tokens that fits, on the "
                                        "length grid (a power-of-two step of at most 1/64 of it; planner/length_grid.py), "
                                        "or the plan's own where no longer grid value fits")
    at_least: list[str] = Field(description="knobs that still fit at the search's cap")


class CollectiveDoc(_Doc):
    name: str
    kind: str
    group: str
    group_size: int
    count: int
    tensor_bytes: float
    bytes_per_rank: float
    time_s: float
    exposed_s: float
    overlapped: bool
    link: str


class CPUMemoryDoc(_Doc):
    bytes_per_node: int = Field(description="offloaded states of the node's ranks")
    node_bytes: int = Field(description="the node's CPU memory (--cpu-memory)")
    fits: bool


class StageDoc(_Doc):
    stage: int
    peak_allocated_bytes: int
    reserved_bytes: int
    device_bytes: int
    peak_phase: str
    breakdown: dict[str, int]
    details: dict[str, int]
    cpu_bytes: int


class FitDocument(_Doc):
    """`planner fit --json`."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="3 since the simulated allocator (`allocator`); "
                                                                    "2: one document for one GPU and many")
    fits: bool = Field(description="the busiest rank fits its card (and offloaded states the node's CPU memory)")
    headroom_bytes: int = Field(description="gpu.memory_bytes - memory.device_bytes (negative: short by that much)")
    gpu: GPUDoc = Field(description="the card, with the memory CUDA reports")
    model: ModelDoc = Field(description="the model the plan names (catalog id, or the config file's)")
    technique: str = Field(description="the plan's task: sft, generate, rm, dpo, ppo, grpo, distill, a plugin's")
    plan: dict[str, Any] = Field(description="every Plan field, defaults included (planner.specs.Plan)")
    layout: LayoutDoc = Field(description="the layout; one GPU is a layout of one")
    engine: str = Field(description="the engine that holds the model states and what it keeps, in its own terms")
    memory: MemoryDoc = Field(description="the busiest rank's memory of one step")
    time: TimeDoc = Field(description="one step's time, split, with tokens/s and FLOP utilisation")
    resident: dict[str, list[str]] = Field(description="models (roles) resident in each phase")
    allocator: AllocatorDoc = Field(description="the caching allocator simulated over the step's allocation trace")
    suggestions: list[SuggestionDoc] = Field(description="when the plan does not fit: changes, each re-estimated")
    limits: LimitsDoc | None = Field(description="when it fits: the largest batch and lengths that still fit")
    warnings: list[str] = Field(description="what the user should know that does not stop the estimate")
    # many GPUs only
    collectives: list[CollectiveDoc] | None = Field(default=None, description="many GPUs: one step's collectives")
    cpu_memory: CPUMemoryDoc | None = Field(default=None, description="many GPUs: offloaded states per node")
    stages: list[StageDoc] | None = Field(default=None, description="many GPUs: first and last pipeline stage")
    model_states: dict[str, dict[str, float]] | None = Field(default=None, description="many GPUs: each model's states on one rank")

    def to_json(self) -> dict[str, Any]:
        doc = self.model_dump(mode="json")
        for extra in ("collectives", "cpu_memory", "stages", "model_states"):
            if doc[extra] is None:
                del doc[extra]
        return doc


def json_schema() -> dict[str, Any]:
    return FitDocument.model_json_schema()


def markdown() -> str:
    """docs/json.md: every block of the document with its fields, then the whole JSON schema
    (regenerate with `python -m planner.answer > docs/json.md`; a test checks it is current)."""
    import json

    schema = json_schema()
    defs = schema.get("$defs", {})
    lines = ["# The answer document of `planner fit --json`", "",
             "Generated from `planner/answer.py` (`python -m planner.answer > docs/json.md`); "
             "`planner fit --json-schema` prints the same schema.", "",
             " ".join((__doc__ or "").split("\n\n")[1].split()), "",
             " ".join((__doc__ or "").split("\n\n")[2].split()), ""]

    def table(title: str, node: dict) -> None:
        lines.extend([f"## `{title}`", ""])
        if node.get("description"):
            lines.extend([" ".join(node["description"].split()), ""])
        lines.extend(["| key | type | meaning |", "|---|---|---|"])
        required = set(node.get("required", []))
        for key, prop in node.get("properties", {}).items():
            lines.append(f"| `{key}` | {_type(prop)}{'' if key in required else ' (optional)'} | "
                         f"{' '.join(prop.get('description', '').split())} |")
        lines.append("")

    table("FitDocument", schema)
    for name, node in defs.items():
        table(name, node)
    lines.extend(["## JSON schema", "", "```json", json.dumps(schema, indent=2), "```", ""])
    return "\n".join(lines)


def _type(prop: dict | bool) -> str:
    if not isinstance(prop, dict):
        return "any"
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    t = prop.get("type", "any")
    if t == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if t == "object" and "additionalProperties" in prop:
        return f"map to {_type(prop['additionalProperties'])}"
    return t


if __name__ == "__main__":  # pragma: no cover
    print(markdown(), end="")
