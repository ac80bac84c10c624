"""LLaMA-Factory YAMLs, as `llamafactory-cli train FILE` takes them (the fields of its ModelArguments,
DataArguments, FinetuningArguments and transformers' Seq2SeqTrainingArguments in one mapping).

Defaults where the file is silent (LLaMA-Factory's hparams dataclasses): finetuning_type lora,
lora_rank 8, lora_alpha 2 x rank, lora_dropout 0, lora_target all (every linear layer), cutoff_len
2048, gradient checkpointing on (disable_gradient_checkpointing false), quantization_method
bitsandbytes with double_quantization true and quantization_type nf4, pref_beta 0.1; the Trainer's
per_device_train_batch_size 8 and optim (transformers 5: adamw_torch_fused).

Precision: LLaMA-Factory loads the model in the compute dtype (bf16 or fp16 with those flags) and,
unless pure_bf16, casts the trainable parameters to fp32: a full fine-tune is then mixed-bf16 (fp32
weights under bf16 autocast), LoRA keeps its base in bf16 (adapters in fp32, as the planner's LoRA
plans hold them). Its DPO computes log-probabilities from the full logits (logprobs full).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.configs import hf
from planner.configs.base import ConfigError, Imported, Reader, not_modelled, skipped

FORMAT = "llamafactory"
STAGES = {"sft": "sft", "pt": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo"}
STAGE_OUT = {"sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo"}
FINETUNING = {"lora": "lora", "full": "full"}
# the plan fields a LLaMA-Factory config states (the others must hold their defaults to be exported)
EXPRESSES = ("model", "task", "method", "precision", "attn", "batch", "grad_accum", "grad_ckpt", "optimizer",
             "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "quant", "double_quant", "beta",
             "logprobs", "seq")
STATED_BY = {
    "precision": ("bf16", "fp16", "pure_bf16"), "batch": ("per_device_train_batch_size",),
    "grad_accum": ("gradient_accumulation_steps",), "grad_ckpt": ("disable_gradient_checkpointing",),
    "optimizer": ("optim",), "seq": ("cutoff_len",), "lora_rank": ("lora_rank",), "lora_alpha": ("lora_alpha",),
    "lora_dropout": ("lora_dropout",), "lora_targets": ("lora_target",), "quant": ("quantization_type",),
    "double_quant": ("double_quantization",), "beta": ("pref_beta",), "method": ("finetuning_type", "quantization_bit"),
}  # fmt: skip
SILENT = hf.TRAINER_SILENT | frozenset({
    "model_name_or_path", "stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
    "quantization_bit", "quantization_method", "quantization_type", "double_quantization", "cutoff_len",
    "per_device_train_batch_size", "gradient_accumulation_steps", "disable_gradient_checkpointing", "bf16", "fp16",
    "pure_bf16", "optim", "deepspeed", "fsdp", "fsdp_config", "flash_attn", "pref_beta", "pref_loss", "template",
    "dataset", "dataset_dir", "eval_dataset", "max_samples", "overwrite_cache", "preprocessing_num_workers",
    "plot_loss", "val_size", "predict_with_generate", "adapter_name_or_path", "export_dir", "infer_backend",
    "tokenized_path", "streaming", "buffer_size", "mix_strategy", "interleave_probs", "default_system",
    "enable_thinking", "image_max_pixels", "video_max_pixels", "trust_remote_code", "cache_dir", "create_new_adapter",
    "do_sample", "ddp_timeout", "save_only_model", "resume_from_checkpoint", "reward_model", "reward_model_type",
    "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards", "max_new_tokens",
    "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "upcast_layernorm", "upcast_lmhead_output",
    "lora_parameters", "include_effective_tokens_per_second", "packing", "neat_packing", "train_on_prompt",
})  # fmt: skip


def looks_like(data: dict[str, Any]) -> bool:
    return "stage" in data or "finetuning_type" in data or "cutoff_len" in data


def read(data: dict[str, Any], name: str, path: Path | None = None, task: str | None = None,
         given: set[str] | None = None) -> Imported:
    r = Reader(data, name, skip=skipped(given, STATED_BY))
    out = Imported(source=name, format=FORMAT)
    stage = r.choice("stage", STAGES, "sft")
    out.plan["task"] = task or stage
    model = r.text("model_name_or_path")
    if model:
        out.plan["model"] = model
    method = r.choice("finetuning_type", FINETUNING, "lora")
    bits = r.integer("quantization_bit")
    if bits is not None:
        if bits != 4 or method != "lora":
            raise r.error("quantization_bit", f"only 4-bit with LoRA (QLoRA) is modelled (got {bits}-bit, {method})")
        qm = (r.text("quantization_method", "bnb") or "bnb").lower()
        if qm not in ("bnb", "bitsandbytes"):
            raise r.error("quantization_method", f"'{qm}' is not modelled (modelled: bnb)")
        method = "qlora"
        out.plan["quant"] = r.choice("quantization_type", {"nf4": "nf4", "fp4": "fp4"}, "nf4")
        out.plan["double_quant"] = r.boolean("double_quantization", True)
    out.plan["method"] = method
    if method in ("lora", "qlora"):
        out.plan["lora_rank"] = r.integer("lora_rank", 8)
        alpha = r.number("lora_alpha")
        if alpha is not None:
            out.plan["lora_alpha"] = alpha
        out.plan["lora_dropout"] = r.number("lora_dropout", 0.0)
        target = r.raw("lora_target", "all")
        names = target.split(",") if isinstance(target, str) else [str(t) for t in target]
        names = [n.strip() for n in names if n.strip()]
        out.plan["lora_targets"] = "all-linear" if names == ["all"] else ",".join(names)
    pure = r.boolean("pure_bf16", False)
    half = "bf16" if (r.boolean("bf16", False) or pure) else "fp16" if r.boolean("fp16", False) else None
    if half is None:
        out.plan["precision"] = "fp32"
    elif method == "full" and not pure:
        out.plan["precision"] = f"mixed-{half}"  # trainable parameters cast to fp32 under half autocast
    else:
        out.plan["precision"] = half
    out.plan["batch"] = r.integer("per_device_train_batch_size", 8)
    out.plan["grad_accum"] = r.integer("gradient_accumulation_steps", 1)
    out.plan["grad_ckpt"] = not r.boolean("disable_gradient_checkpointing", False)
    out.plan["optimizer"] = r.choice("optim", hf.OPTIM, "adamw-fused")
    out.plan["seq"] = r.integer("cutoff_len", 2048)
    attn = r.choice("flash_attn", {"auto": "sdpa", "sdpa": "sdpa", "fa2": "sdpa", "fa3": "sdpa", "disabled": "eager"})
    if attn is not None:
        out.plan["attn"] = attn
    if out.plan["task"] == "dpo":
        out.plan["beta"] = r.number("pref_beta", 0.1)
        loss = (r.text("pref_loss", "sigmoid") or "sigmoid").lower()
        if loss in ("orpo", "simpo"):
            raise r.error("pref_loss", f"'{loss}' trains without a reference model: not modelled (modelled: sigmoid, "
                                       "hinge, ipo)")
    if out.plan["task"] == "ppo":
        raise ConfigError(f"{name}: stage ppo: LLaMA-Factory's PPO (a value head on the policy, TRL 0.9's PPOTrainer) is "
                          "not the planner's ppo step; plan it with --task ppo and flags")
    if stage == "sft" and r.raw("stage") == "pt":
        out.warnings.append(f"{name}: stage pt (pre-training) is planned as sft: the same step over full sequences")
    hf.trainer_layout(r, out, path)
    hf.defaults_weak(out, data, STATED_BY)
    out.warnings += not_modelled(name, r.leftover(SILENT))
    return out


def write(plan: Any, layout: dict[str, Any], deepspeed_file: str | None = None) -> dict[str, Any]:
    """The YAML for `llamafactory-cli train` (its dataset and template left for the user: `dataset`)."""
    from planner.configs.trl import model_ref

    if plan.task not in STAGE_OUT:
        raise ConfigError(f"llamafactory: no stage for task {plan.task} (stages: {', '.join(STAGE_OUT)})")
    if plan.task == "ppo":
        raise ConfigError("llamafactory: its PPO stage is not the planner's ppo step (value head on the policy)")
    if plan.task == "dpo" and plan.logprobs != "full":
        raise ConfigError(f"llamafactory: its DPO computes log-probabilities from the full logits (logprobs full), "
                          f"not {plan.logprobs}")
    half = {"fp32": None, "bf16": "bf16", "fp16": "fp16", "mixed-bf16": "bf16", "mixed-fp16": "fp16"}[plan.precision]
    if plan.method == "full" and plan.precision == "fp16":
        raise ConfigError("llamafactory: a full fine-tune in fp16 weights has no setting (fp16 runs mixed-fp16)")
    out: dict[str, Any] = {
        "model_name_or_path": model_ref(plan.model),
        "stage": plan.task,
        "do_train": True,
        "finetuning_type": "full" if plan.method == "full" else "lora",
        "dataset": "identity",
        "template": "default",
        "cutoff_len": plan.seq,
        "output_dir": "saves/planner",
        "per_device_train_batch_size": plan.batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "disable_gradient_checkpointing": not plan.grad_ckpt,
        "optim": hf.optim_out(plan.optimizer),
        "flash_attn": "sdpa" if plan.attn == "sdpa" else "disabled",
    }
    if half is not None:
        out[half] = True
    if plan.precision == "bf16" and plan.method == "full":
        out["pure_bf16"] = True
    if plan.method in ("lora", "qlora"):
        out.update(lora_rank=plan.lora_rank, lora_alpha=hf.whole(plan.alpha), lora_dropout=plan.lora_dropout,
                   lora_target="all" if plan.lora_targets == "all-linear" else plan.lora_targets)
    if plan.method == "qlora":
        out.update(quantization_bit=4, quantization_method="bnb", quantization_type=plan.quant,
                   double_quantization=plan.double_quant)
    if plan.task == "dpo":
        out.update(pref_beta=plan.beta, pref_loss="sigmoid")
        if plan.ref_logprobs != "model":
            raise ConfigError("llamafactory: its DPO keeps a reference model (ref_logprobs model)")
    if deepspeed_file is not None:
        out["deepspeed"] = deepspeed_file
    if layout.get("fsdp"):
        raise ConfigError("llamafactory: FSDP goes through an accelerate config (export --to accelerate)")
    return out
