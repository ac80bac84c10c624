"""accelerate config YAMLs (`accelerate launch --config_file`): distributed type, processes, machines,
mixed precision, and the DeepSpeed or FSDP section (or the DeepSpeed JSON it names).

accelerate's `mixed_precision` is autocast over the model as loaded: alone it means mixed-bf16 /
mixed-fp16 / fp32 (a weak setting: a trainer's config that states the precision wins, and must agree
on the half type).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.configs.base import ConfigError, Imported, Reader, not_modelled
from planner.configs.deepspeed import offload_layout

FORMAT = "accelerate"

DISTRIBUTED = ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
MIXED = {"no": "fp32", "bf16": "mixed-bf16", "fp16": "mixed-fp16"}
# FSDP1's sharding strategies by name and by number (torch.distributed.fsdp.ShardingStrategy); NO_SHARD is DDP
SHARDING = {"FULL_SHARD": "full-shard", "1": "full-shard", "SHARD_GRAD_OP": "shard-grad-op", "2": "shard-grad-op",
            "NO_SHARD": None, "3": None}
SILENT = frozenset({
    "compute_environment", "debug", "machine_rank", "main_training_function", "main_process_ip",
    "main_process_port", "rdzv_backend", "same_network", "tpu_env", "tpu_use_cluster", "tpu_use_sudo",
    "downcast_bf16", "enable_cpu_affinity", "gpu_ids", "use_cpu", "num_machines", "num_processes",
    "distributed_type", "mixed_precision", "deepspeed_config", "fsdp_config", "megatron_lm_config", "ipex_config",
    "mpirun_config", "parallelism_config",
})  # fmt: skip
DS_SILENT = frozenset({"zero3_init_flag", "zero3_save_16bit_model", "gradient_clipping", "deepspeed_multinode_launcher",
                       "deepspeed_hostfile", "deepspeed_exclusion_filter", "deepspeed_inclusion_filter"})
FSDP_SILENT = frozenset({
    "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap", "fsdp_state_dict_type", "fsdp_sync_module_states",
    "fsdp_use_orig_params", "fsdp_cpu_ram_efficient_loading", "fsdp_min_num_params",
})  # fmt: skip


def looks_like(data: dict[str, Any]) -> bool:
    return "distributed_type" in data or "compute_environment" in data


def read(data: dict[str, Any], name: str, path: Path | None = None, task: str | None = None,
         given: set[str] | None = None) -> Imported:
    """The file's settings (every reader takes the same arguments; accelerate's names no task)."""
    r = Reader(data, name)
    out = Imported(source=name, format=FORMAT)
    if r.boolean("use_cpu", False):
        raise r.error("use_cpu", "a CPU run is not a GPU plan")
    dist = (r.text("distributed_type", "NO") or "NO").upper()
    if dist not in DISTRIBUTED:
        raise r.error("distributed_type", f"'{dist}' is not modelled (modelled: {', '.join(DISTRIBUTED)})")
    machines = r.integer("num_machines", 1)
    procs = r.integer("num_processes", 1)
    if dist != "NO" and (procs > 1 or dist in ("DEEPSPEED", "FSDP")):
        if procs % machines:
            raise r.error("num_processes", f"{procs} processes do not split evenly over {machines} machines")
        out.layout["gpus"] = procs
        if machines > 1:
            out.layout["gpus_per_node"] = procs // machines
    mixed = r.choice("mixed_precision", MIXED)
    if mixed is not None:
        out.weak["precision"] = mixed
    if dist == "DEEPSPEED":
        _deepspeed(r, out, name, path)
    elif dist == "FSDP":
        _fsdp(r, out)
    out.warnings += not_modelled(name, r.leftover(SILENT))
    return out


def _deepspeed(r: Reader, out: Imported, name: str, path: Path | None) -> None:
    ds = r.section("deepspeed_config")
    if ds is None:
        raise r.error("deepspeed_config", "distributed_type DEEPSPEED needs a deepspeed_config section")
    file = ds.text("deepspeed_config_file")
    if file:
        base = path.parent if path is not None else Path(".")
        out.includes.append((ds.where("deepspeed_config_file"), base / file))
        # with a config file accelerate takes everything else from it
        out.warnings += not_modelled(name, ds.leftover(DS_SILENT))
        return
    stage = ds.integer("zero_stage", 0, minimum=0)
    if stage > 3:
        raise ds.error("zero_stage", f"ZeRO stages are 0-3 (got {stage})")
    out.layout["zero"] = stage
    keys = ("offload_optimizer_device", "offload_param_device")
    offload = offload_layout(ds, keys, *((ds.text(k, "none") or "none").lower() for k in keys))
    if offload is not None:
        out.layout["offload"] = offload
    accum = ds.integer("gradient_accumulation_steps") if not ds.auto("gradient_accumulation_steps") else None
    if accum is not None:
        out.plan["grad_accum"] = accum
    ds.consume("gradient_accumulation_steps")
    out.warnings += not_modelled(r.name, ds.leftover(DS_SILENT))


def _fsdp(r: Reader, out: Imported) -> None:
    fs = r.section("fsdp_config")
    if fs is None:
        raise r.error("fsdp_config", "distributed_type FSDP needs an fsdp_config section")
    version = fs.integer("fsdp_version", 1)
    if version == 2 or fs.has("fsdp_reshard_after_forward"):
        reshard = fs.boolean("fsdp_reshard_after_forward", True)
        strategy: str | None = "full-shard" if reshard else "shard-grad-op"
    else:
        strategy = fs.choice("fsdp_sharding_strategy", SHARDING, "full-shard")
    if strategy is not None:
        out.layout["fsdp"] = strategy
    if fs.boolean("fsdp_offload_params", False):
        out.layout["offload"] = "optimizer+params"  # FSDP's CPUOffload: parameters and gradients; the step on the CPU
    if fs.boolean("fsdp_activation_checkpointing", False):
        out.plan["grad_ckpt"] = True
    out.warnings += not_modelled(r.name, fs.leftover(FSDP_SILENT))


def write(plan: Any, layout: dict[str, Any], deepspeed_file: str | None = None) -> dict[str, Any]:
    """The accelerate config of a layout (DeepSpeed through `deepspeed_file` when given)."""
    gpus = layout.get("gpus", 1)
    per_node = layout.get("gpus_per_node") or min(gpus, 8)
    machines = -(-gpus // per_node)
    mixed = {"bf16": "bf16", "mixed-bf16": "bf16", "fp16": "fp16", "mixed-fp16": "fp16", "fp32": "no"}[plan.precision]
    if layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1:
        raise ConfigError("accelerate: tensor and pipeline parallelism are not expressible in an accelerate config "
                          "without Megatron-LM (the planner models TP/PP layouts, not that launcher)")
    out: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "debug": False, "machine_rank": 0,
                           "main_training_function": "main", "mixed_precision": mixed, "num_machines": machines,
                           "num_processes": gpus, "rdzv_backend": "static", "same_network": True, "use_cpu": False}
    if layout.get("fsdp"):
        out["distributed_type"] = "FSDP"
        out["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": {"full-shard": "FULL_SHARD", "shard-grad-op": "SHARD_GRAD_OP"}[layout["fsdp"]],
            "fsdp_offload_params": layout.get("offload", "none") != "none",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": False,
            "fsdp_use_orig_params": True,
        }
        if layout.get("offload", "none") == "optimizer":
            raise ConfigError("accelerate: FSDP offloads parameters and optimizer together (offload optimizer+params)")
    elif layout.get("zero") is not None:
        out["distributed_type"] = "DEEPSPEED"
        if deepspeed_file is not None:
            out["deepspeed_config"] = {"deepspeed_config_file": deepspeed_file, "zero3_init_flag": layout["zero"] == 3}
        else:
            offload = layout.get("offload", "none")
            out["deepspeed_config"] = {
                "zero_stage": layout["zero"],
                "offload_optimizer_device": "cpu" if offload != "none" else "none",
                "offload_param_device": "cpu" if offload == "optimizer+params" else "none",
                "gradient_accumulation_steps": plan.grad_accum,
                "zero3_init_flag": layout["zero"] == 3,
            }
    else:
        out["distributed_type"] = "MULTI_GPU" if gpus > 1 else "NO"
    return out
