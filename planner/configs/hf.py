"""What the trainers built on transformers' TrainingArguments share (TRL, LLaMA-Factory): the
optimizer names, the precision from bf16/fp16 and the model's dtype, the attention implementation,
and the Trainer's own `deepspeed` / `fsdp` keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.configs.base import Imported, Reader, not_modelled

# transformers' OptimizerNames the planner models
OPTIM = {
    "adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "adamw-fused", "adamw_bnb_8bit": "adamw-8bit",
    "adamw_8bit": "adamw-8bit", "paged_adamw_8bit": "paged-adamw-8bit", "sgd": "sgd",
}  # fmt: skip
OPTIM_OUT = {"adamw": "adamw_torch", "adamw-fused": "adamw_torch_fused", "adamw-8bit": "adamw_bnb_8bit",
             "paged-adamw-8bit": "paged_adamw_8bit", "sgd": "sgd"}
DTYPES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
          "half": "fp16", "auto": "auto"}
ATTN = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "sdpa", "fa2": "sdpa", "flash_attention_3": "sdpa"}

# TrainingArguments keys that change neither memory nor time
TRAINER_SILENT = frozenset({
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "eval_strategy", "evaluation_strategy",
    "eval_steps", "per_device_eval_batch_size", "eval_accumulation_steps", "learning_rate", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "log_level", "logging_dir",
    "logging_strategy", "logging_first_step", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
    "save_only_model", "seed", "data_seed", "run_name", "report_to", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "hub_token", "resume_from_checkpoint", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_drop_last", "remove_unused_columns", "label_names", "load_best_model_at_end", "metric_for_best_model",
    "greater_is_better", "ddp_timeout", "ddp_find_unused_parameters", "gradient_checkpointing_kwargs",
    "optim_args", "disable_tqdm", "tf32", "bf16_full_eval", "fp16_full_eval", "local_rank", "use_cpu",
    "include_tokens_per_second", "include_num_input_tokens_seen", "save_safetensors", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "group_by_length", "length_column_name", "ignore_data_skip", "prediction_loss_only",
    "log_on_each_node", "logging_nan_inf_filter", "save_on_each_node", "full_determinism", "model_revision",
    "trust_remote_code", "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
    "dataset_streaming", "dataset_text_field", "dataset_num_proc", "dataset_kwargs", "dataset_mixture",
    "eval_on_start", "hub_always_push", "torch_empty_cache_steps", "restore_callback_states_from_checkpoint",
    "shuffle_dataset", "chat_template_path", "eos_token", "pad_token", "completion_only_loss", "assistant_only_loss",
    "truncation_mode", "warmup_steps", "env", "average_tokens_across_devices", "accelerator_config",
    "chat_template", "dataset_prompt_column", "system_prompt", "dataset_mixer", "dataset_splits", "model_revision",
})  # fmt: skip
# keys that may change memory or time and that the planner does not model (named in a warning)
NOT_MODELLED_NOTE = ("torch_compile", "use_liger_kernel", "liger_kernel_config", "activation_offloading", "padding_free",
                     "neftune_noise_alpha")


def precision(r: Reader, dtype: str | None, bf16_default: bool | None) -> str | None:
    """The plan's precision from the Trainer's bf16/fp16 and the dtype the model is loaded in:
    autocast over fp32 weights is mixed-*, over half weights the half type; no autocast: the dtype.
    `bf16_default`: the trainer's default for bf16 when neither flag is set (TRL: bf16 = not fp16)."""
    fp16 = r.boolean("fp16", False)
    bf16 = r.boolean("bf16")
    if bf16 is None:
        bf16 = (not fp16) if bf16_default else False
    if bf16 and fp16:
        raise r.error("fp16", "bf16 and fp16 are both on")
    half = "bf16" if bf16 else "fp16" if fp16 else None
    if dtype in (None, "auto"):
        # "auto" loads the checkpoint's dtype: the catalog's models ship in bf16
        dtype = half or "bf16"
    if half is None:
        return dtype
    if dtype == "fp32":
        return f"mixed-{half}"
    return dtype


def trainer_layout(r: Reader, out: Imported, path: Path | None, config_alone: bool = False) -> None:
    """The Trainer's `deepspeed` (a JSON path, or the config inline) and `fsdp` keys (`config_alone`:
    an `fsdp_config` without `fsdp` turns FSDP on, as axolotl's does)."""
    ds = r.raw("deepspeed")
    if isinstance(ds, str) and ds:
        base = path.parent if path is not None else Path(".")
        out.includes.append((r.where("deepspeed"), base / ds))
    elif isinstance(ds, dict):
        out.includes.append((r.where("deepspeed"), ds))  # type: ignore[arg-type]
    fsdp = r.raw("fsdp")
    conf = r.section("fsdp_config")
    on = bool(fsdp) and not (isinstance(fsdp, str) and fsdp.strip().lower() in ("false", "no", ""))
    if config_alone and fsdp is None and conf is not None:
        on, fsdp = True, True
    if on:
        # transformers 5: fsdp: true with fsdp_config {version: 2, reshard_after_forward, cpu_offload}; the
        # older word list ("full_shard auto_wrap offload") is converted to those keys
        words = [] if fsdp is True or (isinstance(fsdp, str) and fsdp.strip().lower() == "true") else (
            fsdp.split() if isinstance(fsdp, str) else [str(w) for w in fsdp])
        if "hybrid_shard" in words or "hybrid_shard_zero2" in words:
            raise r.error("fsdp", "hybrid sharding is not modelled (modelled: full_shard, shard_grad_op)")
        # the keys with accelerate's fsdp_ prefix too (axolotl and older transformers write them so)
        def flag(*keys: str) -> bool | None:
            for k in keys:
                for name in (k, f"fsdp_{k}"):
                    if conf is not None and conf.has(name):
                        return conf.boolean(name)
            return None

        reshard = flag("reshard_after_forward")
        strategy = None
        if conf is not None:
            for name in ("sharding_strategy", "fsdp_sharding_strategy"):
                if conf.has(name):
                    from planner.configs.accelerate import SHARDING

                    strategy = conf.choice(name, {k: v for k, v in SHARDING.items() if v is not None})
        if reshard is None:
            reshard = strategy != "shard-grad-op" and "shard_grad_op" not in words
        out.layout["fsdp"] = "full-shard" if reshard else "shard-grad-op"
        offload = flag("cpu_offload", "offload_params")
        if offload or (offload is None and "offload" in words):
            out.layout["offload"] = "optimizer+params"
        if flag("activation_checkpointing"):
            out.plan["grad_ckpt"] = True
        if conf is not None:
            quiet = ("version", "auto_wrap_policy", "transformer_layer_cls_to_wrap", "min_num_params",
                     "state_dict_type", "cpu_ram_efficient_loading", "use_orig_params", "sync_module_states",
                     "xla", "xla_fsdp_v2", "xla_fsdp_grad_ckpt", "limit_all_gathers")
            conf.consume(*quiet, *(f"fsdp_{k}" for k in quiet))
            out.warnings += not_modelled(r.name, conf.leftover())
    r.consume("fsdp_config")


def defaults_weak(out: Imported, data: dict[str, Any], stated_by: dict[str, tuple[str, ...]]) -> None:
    """Fields the file does not state (the tool's defaults) move to `weak`: another file that states
    them wins without a conflict."""
    for field, keys in stated_by.items():
        if field in out.plan and not any(data.get(k) is not None for k in keys):
            out.weak[field] = out.plan.pop(field)


def optim_out(name: str) -> str:
    """transformers' optim name of a planner optimizer (ConfigError where it has none)."""
    from planner.configs.base import ConfigError

    if name not in OPTIM_OUT:
        raise ConfigError(f"optimizer: {name} has no transformers optim name (those with one: {', '.join(OPTIM_OUT)})")
    return OPTIM_OUT[name]


def whole(x: float) -> "int | float":
    """A float that is a whole number as an int (what the tools' configs write)."""
    return int(x) if float(x).is_integer() else x
