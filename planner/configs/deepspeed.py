"""DeepSpeed JSON configs (`deepspeed --deepspeed_config`, a trainer's `deepspeed:` key, accelerate's
`deepspeed_config_file`): ZeRO stage and offload, micro-batch, accumulation, bf16/fp16, optimizer.

"auto" values (the HF Trainer's convention) are left to the trainer's own config: the file sets
nothing for them. The batch rule DeepSpeed enforces, train_batch_size = micro-batch x accumulation x
world size, is checked where all three are known (planner.configs.read_configs).
"""

from __future__ import annotations

from typing import Any

from planner.configs.base import ConfigError, Imported, Reader, not_modelled

FORMAT = "deepspeed"

# keys that change neither memory nor time (logging, schedules, checkpoint saving)
SILENT = frozenset({
    "scheduler", "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
    "prescale_gradients", "gradient_predivide_factor", "dump_state", "flops_profiler", "tensorboard", "wandb",
    "csv_monitor", "comms_logger", "checkpoint", "data_efficiency", "elasticity", "zero_force_ds_cpu_optimizer",
})  # fmt: skip
ZERO_SILENT = frozenset({
    "stage", "offload_optimizer", "offload_param", "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save", "round_robin_gradients", "allgather_partitions", "reduce_scatter",
    "contiguous_gradients", "load_from_fp32_weights", "ignore_unused_parameters", "elastic_checkpoint",
})  # fmt: skip
OPTIMIZERS = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd"}
OFFLOAD_DEVICES = ("none", "cpu")


def looks_like(data: dict[str, Any]) -> bool:
    keys = set(data)
    return bool(keys & {"zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size"}) or (
        bool(keys & {"bf16", "fp16"}) and isinstance(data.get("bf16", data.get("fp16")), dict))


def read(data: dict[str, Any], name: str, path: Any = None, task: str | None = None,
         given: set[str] | None = None) -> Imported:
    """The file's settings (every reader takes the same arguments; a DeepSpeed file names no task or other file)."""
    r = Reader(data, name)
    out = Imported(source=name, format=FORMAT)
    zero = r.section("zero_optimization")
    if zero is not None:
        stage = zero.integer("stage", 0, minimum=0) if not zero.auto("stage") else None
        if stage is not None:
            if stage > 3:
                raise zero.error("stage", f"ZeRO stages are 0-3 (got {stage})")
            out.layout["zero"] = stage
        offload = offload_layout(zero, ("offload_optimizer", "offload_param"),
                                 _offload_device(zero, "offload_optimizer"), _offload_device(zero, "offload_param"))
        if offload is not None:
            out.layout["offload"] = offload
        leftover = zero.leftover(ZERO_SILENT)
        out.warnings += not_modelled(name, leftover)
    for key, field in (("train_micro_batch_size_per_gpu", "batch"), ("gradient_accumulation_steps", "grad_accum")):
        if r.auto(key):
            r.consume(key)
        else:
            v = r.integer(key)
            if v is not None:
                out.plan[field] = v
    if r.auto("train_batch_size"):
        r.consume("train_batch_size")
    else:
        total = r.integer("train_batch_size")
        if total is not None:
            out.checks["train_batch_size"] = total
    precision = None
    for key in ("bf16", "fp16"):
        sec = r.section(key)
        if sec is None:
            continue
        enabled = None if sec.auto("enabled") else sec.boolean("enabled", False)
        sec.consume("enabled", "loss_scale", "loss_scale_window", "initial_scale_power", "hysteresis",
                    "min_loss_scale", "auto_cast", "consecutive_hysteresis", "immediate_grad_update")
        out.warnings += not_modelled(name, sec.leftover())
        if enabled:
            if precision is not None:
                raise r.error(key, "bf16 and fp16 are both enabled")
            precision = key
    if precision is not None:
        # DeepSpeed holds a half-precision model and fp32 master weights (the layout's deepspeed engine)
        out.weak["precision"] = precision
    opt = r.section("optimizer")
    if opt is not None:
        if not opt.auto("type"):
            out.plan["optimizer"] = opt.choice("type", OPTIMIZERS)
        opt.consume("type", "params")
    out.warnings += not_modelled(name, r.leftover(SILENT))
    return out


def offload_layout(r: Reader, keys: tuple[str, str], optimizer: str, params: str) -> str | None:
    """The layout's offload from DeepSpeed's two offload devices (none or cpu; `keys`: where the file
    states them, for the errors): None, "optimizer" or "optimizer+params"."""
    for key, dev in zip(keys, (optimizer, params)):
        if dev not in OFFLOAD_DEVICES:
            raise r.error(key, f"'{dev}' is not modelled (modelled: {', '.join(OFFLOAD_DEVICES)})")
    if params == "cpu" and optimizer != "cpu":
        raise r.error(keys[1], "parameters offloaded without the optimizer is not modelled "
                               "(modelled: the optimizer alone, or both on cpu)")
    if optimizer == "cpu":
        return "optimizer+params" if params == "cpu" else "optimizer"
    return None


def _offload_device(zero: Reader, key: str) -> str:
    sec = zero.section(key)
    if sec is None:
        return "none"
    dev = "none" if sec.auto("device") else (sec.text("device", "none") or "none").lower()
    if dev not in OFFLOAD_DEVICES:
        raise sec.error("device", f"'{dev}' is not modelled (modelled: {', '.join(OFFLOAD_DEVICES)})")
    sec.consume("device", "pin_memory", "buffer_count", "fast_init", "ratio", "buffer_size", "max_in_cpu")
    return dev


def write(plan: Any, layout: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a plan: its ZeRO stage and offload, batch and precision (the optimizer
    and its schedule left to the trainer: "auto")."""
    zero = layout.get("zero")
    if zero is None:
        raise ConfigError("deepspeed: the plan has no ZeRO stage (give --zero 0-3)")
    if plan.precision in ("fp32", "mixed-bf16", "mixed-fp16"):
        raise ConfigError(f"deepspeed: precision {plan.precision} has no DeepSpeed equivalent (DeepSpeed holds the "
                          "model in bf16 or fp16 with fp32 master weights: precision bf16 or fp16)")
    section: dict[str, Any] = {"stage": zero}
    offload = layout.get("offload", "none")
    if offload != "none":
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer+params":
        section["offload_param"] = {"device": "cpu", "pin_memory": True}
    extra = {}
    if offload != "none":
        # the trainer's own optimizer steps the offloaded states (DeepSpeed otherwise insists on its C++ CPU Adam:
        # engine.py, zero_force_ds_cpu_optimizer defaults to true)
        extra["zero_force_ds_cpu_optimizer"] = False
    return {**extra,
        "zero_optimization": section,
        "bf16": {"enabled": plan.precision == "bf16"},
        "fp16": {"enabled": plan.precision == "fp16"},
        "train_micro_batch_size_per_gpu": plan.batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
