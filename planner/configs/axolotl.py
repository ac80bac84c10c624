"""axolotl YAMLs, as `axolotl train FILE` takes them (its AxolotlInputConfig).

Defaults where the file is silent (axolotl's schema at 067b021c, 2026-07-24): micro_batch_size 1,
gradient_accumulation_steps 1, sequence_len 512, gradient_checkpointing off, optimizer
adamw_torch_fused, bf16 "auto" (on where the card has bf16). axolotl loads the model in bf16 or fp16
when that flag is on (the LoRA adapters in fp32), so a plan's precision is that half type; with
`bf16: false` and no fp16, fp32. FSDP: `fsdp_config` (FSDP2 keys, with or without the fsdp_ prefix)
turns it on; the `fsdp:` list is the deprecated spelling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.configs import hf
from planner.configs.base import ConfigError, Imported, Reader, not_modelled, skipped

FORMAT = "axolotl"
RL = {"dpo": "dpo", "grpo": "grpo"}
# the plan fields an axolotl config states (the others must hold their defaults to be exported)
EXPRESSES = ("model", "task", "method", "precision", "attn", "batch", "grad_accum", "grad_ckpt", "optimizer",
             "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "quant", "double_quant", "beta",
             "logprobs", "seq")
STATED_BY = {
    "precision": ("bf16", "fp16"), "batch": ("micro_batch_size",), "grad_accum": ("gradient_accumulation_steps",),
    "grad_ckpt": ("gradient_checkpointing",), "optimizer": ("optimizer",), "seq": ("sequence_len",),
    "lora_rank": ("lora_r",), "lora_alpha": ("lora_alpha",), "lora_dropout": ("lora_dropout",),
    "lora_targets": ("lora_target_modules", "lora_target_linear"), "beta": ("dpo_beta", "rl_beta"),
}  # fmt: skip
SILENT = hf.TRAINER_SILENT | frozenset({
    "base_model", "base_model_config", "model_type", "tokenizer_type", "tokenizer_config", "is_llama_derived_model",
    "is_mistral_derived_model", "is_qwen_derived_model", "load_in_8bit", "load_in_4bit", "adapter", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "lora_fan_in_fan_out",
    "lora_model_dir", "sequence_len", "sample_packing", "eval_sample_packing", "pad_to_sequence_len", "micro_batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "gradient_checkpointing_kwargs", "bf16", "fp16", "tf32",
    "optimizer", "flash_attention", "sdp_attention", "eager_attention", "xformers_attention", "deepspeed", "fsdp",
    "fsdp_config", "rl", "dpo_beta", "rl_beta", "trl", "datasets", "test_datasets", "dataset_prepared_path",
    "val_set_size", "chat_template", "special_tokens", "tokens", "wandb_project", "wandb_entity", "wandb_watch",
    "wandb_name", "wandb_log_model", "hub_model_id", "strict", "train_on_inputs", "group_by_length", "lr_scheduler",
    "cosine_min_lr_ratio", "early_stopping_patience", "local_rank", "logging_steps", "xformers_attention",
    "warmup_steps", "warmup_ratio", "evals_per_epoch", "eval_table_size", "eval_max_new_tokens", "saves_per_epoch",
    "save_steps", "debug", "weight_decay", "num_epochs", "max_steps", "learning_rate", "output_dir",
    "resume_from_checkpoint", "auto_resume_from_checkpoints", "seed", "shuffle_merged_datasets", "dataset_processes",
    "plugins", "save_first_step", "loss_watchdog_threshold", "loss_watchdog_patience", "max_grad_norm",
    "peft_use_rslora", "lora_modules_to_save", "embeddings_skip_upcast", "use_tensorboard", "hub_strategy",
    "remove_unused_columns", "special_tokens", "bnb_config_kwargs", "trust_remote_code", "eval_steps",
    "attn_implementation", "fsdp_version",
})  # fmt: skip


def looks_like(data: dict[str, Any]) -> bool:
    return "base_model" in data or "micro_batch_size" in data or "sequence_len" in data


def read(data: dict[str, Any], name: str, path: Path | None = None, task: str | None = None,
         given: set[str] | None = None) -> Imported:
    r = Reader(data, name, skip=skipped(given, STATED_BY))
    out = Imported(source=name, format=FORMAT)
    rl = r.choice("rl", RL)
    out.plan["task"] = task or rl or "sft"
    model = r.text("base_model")
    if model:
        out.plan["model"] = model
    adapter = (r.text("adapter") or "").lower() or None
    four, eight = r.boolean("load_in_4bit", False), r.boolean("load_in_8bit", False)
    if eight:
        raise r.error("load_in_8bit", "8-bit (LLM.int8) models are not modelled (modelled: adapter qlora, load_in_4bit)")
    if adapter not in (None, "lora", "qlora"):
        raise r.error("adapter", f"'{adapter}' is not modelled (modelled: lora, qlora)")
    if adapter == "qlora" and not four:
        raise r.error("load_in_4bit", "adapter qlora needs load_in_4bit: true")
    if four and adapter is None:
        raise r.error("load_in_4bit", "a 4-bit model trains only through an adapter (adapter: qlora)")
    method = "full" if adapter is None else "qlora" if four else "lora"
    out.plan["method"] = method
    if method != "full":
        out.plan["lora_rank"] = r.integer("lora_r", 8)
        out.plan["lora_alpha"] = r.number("lora_alpha", 16.0)
        out.plan["lora_dropout"] = r.number("lora_dropout", 0.0)
        if r.boolean("lora_target_linear", False):
            out.plan["lora_targets"] = "all-linear"
        else:
            mods = r.raw("lora_target_modules")
            if mods is None:
                out.plan["lora_targets"] = "q_proj,v_proj"  # peft's default for the catalog's architectures
            else:
                out.plan["lora_targets"] = mods if isinstance(mods, str) else ",".join(str(m) for m in mods)
    if method == "qlora":
        kw = r.raw("bnb_config_kwargs") or {}
        out.plan["quant"] = str(kw.get("bnb_4bit_quant_type", "nf4"))
        out.plan["double_quant"] = bool(kw.get("bnb_4bit_use_double_quant", True))
    # bf16 defaults to "auto": on wherever the card has bf16 (every card the planner prices training on)
    bf16 = r.raw("bf16", "auto")
    fp16 = r.boolean("fp16", False)
    half = "bf16" if (bf16 is True or (isinstance(bf16, str) and bf16.lower() in ("auto", "true"))) else None
    if fp16:
        if half and bf16 is True:
            raise r.error("fp16", "bf16 and fp16 are both on")
        half = "fp16"
    out.plan["precision"] = half or "fp32"
    out.plan["batch"] = r.integer("micro_batch_size", 1)
    out.plan["grad_accum"] = r.integer("gradient_accumulation_steps", 1)
    ckpt = r.raw("gradient_checkpointing", False)
    if isinstance(ckpt, str) and ckpt.lower() not in ("true", "false"):
        raise r.error("gradient_checkpointing", f"'{ckpt}' checkpointing (offloaded activations) is not modelled "
                                                "(modelled: true, false)")
    out.plan["grad_ckpt"] = ckpt is True or (isinstance(ckpt, str) and ckpt.lower() == "true")
    out.plan["optimizer"] = r.choice("optimizer", hf.OPTIM, "adamw-fused")
    out.plan["seq"] = r.integer("sequence_len", 512)
    impl = r.choice("attn_implementation", hf.ATTN)
    if impl is not None:
        out.plan["attn"] = impl
    elif r.boolean("eager_attention", False):
        out.plan["attn"] = "eager"
    elif r.boolean("sdp_attention", False) or r.boolean("flash_attention", False):
        out.plan["attn"] = "sdpa"
    if out.plan["task"] == "dpo":
        beta = r.number("dpo_beta") if r.has("dpo_beta") else r.number("rl_beta", 0.1)
        out.plan["beta"] = beta
        out.plan["logprobs"] = "fused"  # axolotl runs TRL's DPOTrainer
    if out.plan["task"] == "grpo":
        trl = r.section("trl")
        group = (trl.integer("num_generations", 8, minimum=2) if trl else 8)
        if out.plan["batch"] % group:
            raise r.error("micro_batch_size", f"{out.plan['batch']} completions do not hold whole groups of "
                                              f"num_generations {group}")
        out.plan["batch"] //= group
        out.plan["group_size"] = group
        if trl is not None:
            out.plan["new_tokens"] = trl.integer("max_completion_length", 256)
            out.plan["kl_coef"] = trl.number("beta", 0.0)
            if trl.boolean("use_vllm", False):
                from planner.configs.trl import VLLM_NOTE

                out.warnings.append(f"{name}: trl." + VLLM_NOTE)
            out.warnings += not_modelled(name, trl.leftover(frozenset({"reward_funcs", "reward_weights"})))
    hf.trainer_layout(r, out, path, config_alone=True)
    hf.defaults_weak(out, data, STATED_BY)
    out.warnings += not_modelled(name, r.leftover(SILENT))
    return out


def write(plan: Any, layout: dict[str, Any], deepspeed_file: str | None = None) -> dict[str, Any]:
    """The YAML for `axolotl train` (a dataset left for the user: `datasets`)."""
    from planner.configs.trl import model_ref

    if plan.task not in ("sft", "dpo"):
        raise ConfigError(f"axolotl: task {plan.task} is not exported (exported: sft, dpo)")
    if plan.precision.startswith("mixed"):
        raise ConfigError(f"axolotl: precision {plan.precision} has no setting (axolotl loads the model in the half "
                          "type it trains in: bf16 or fp16)")
    out: dict[str, Any] = {
        "base_model": model_ref(plan.model),
        "datasets": [{"path": "mhenrichsen/alpaca_2k_test", "type": "alpaca"}],
        "sequence_len": plan.seq,
        "micro_batch_size": plan.batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_checkpointing": plan.grad_ckpt,
        "optimizer": hf.optim_out(plan.optimizer),
        "bf16": plan.precision == "bf16",
        "fp16": plan.precision == "fp16",
        "output_dir": "./outputs/planner",
    }
    out["attn_implementation"] = plan.attn  # (sdp_attention / eager_attention are deprecated spellings)
    if plan.method != "full":
        out.update(adapter=plan.method, lora_r=plan.lora_rank, lora_alpha=hf.whole(plan.alpha), lora_dropout=plan.lora_dropout)
        if plan.lora_targets == "all-linear":
            out["lora_target_linear"] = True
        else:
            out["lora_target_modules"] = plan.target_list
    if plan.method == "qlora":
        out["load_in_4bit"] = True
        if plan.quant != "nf4" or not plan.double_quant:
            out["bnb_config_kwargs"] = {"bnb_4bit_quant_type": plan.quant, "bnb_4bit_use_double_quant": plan.double_quant}
    if plan.task == "dpo":
        if plan.logprobs != "fused":
            raise ConfigError(f"axolotl: its DPO runs TRL's DPOTrainer (logprobs fused), not {plan.logprobs}")
        out.update(rl="dpo", rl_beta=plan.beta)  # (dpo_beta is deprecated, copied into rl_beta)
    if deepspeed_file is not None:
        out["deepspeed"] = deepspeed_file
    if layout.get("fsdp"):
        if layout.get("offload", "none") == "optimizer":
            raise ConfigError("offload: FSDP offloads parameters and optimizer together (offload optimizer+params)")
        # fsdp_config alone (the `fsdp:` list is deprecated), FSDP2's keys without the fsdp_ prefix
        out["fsdp_version"] = 2
        out["fsdp_config"] = {"reshard_after_forward": layout["fsdp"] == "full-shard",
                              "offload_params": layout.get("offload", "none") != "none",
                              "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    return out
