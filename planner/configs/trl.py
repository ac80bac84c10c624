"""TRL config YAMLs, as `trl sft|dpo|grpo|reward --config FILE` takes them (TRL 1.16: the fields of
SFTConfig, DPOConfig, GRPOConfig or RewardConfig, TrainingArguments' among them, and ModelConfig's).

The file does not say which trainer reads it: a task given by flag or plan file decides, else the
keys only one trainer has (DPO's `beta` / `precompute_ref_log_probs`, GRPO's `num_generations` /
`max_completion_length`, the reward trainer's `center_rewards_coefficient`), else sft.

TRL's defaults apply to what the file leaves out (trl 1.16.0, read from its config classes):
per_device_train_batch_size 8, max_length 1024, gradient_checkpointing true, bf16 = not fp16,
optim adamw_torch_fused, ModelConfig dtype float32 (so bf16 autocast over fp32 weights: mixed-bf16),
lora_r 16, lora_alpha 32, lora_dropout 0.05, lora_target_modules None (peft's default for the
architecture: q_proj and v_proj for the Llama, Mistral, Qwen2 and Gemma families),
use_bnb_nested_quant false; GRPO: num_generations 8, max_completion_length 512, beta 0.0 (no reference
model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.configs import hf
from planner.configs.base import ConfigError, Imported, Reader, not_modelled, skipped

FORMAT = "trl"
TASKS = {"sft": "sft", "dpo": "dpo", "grpo": "grpo", "rm": "reward"}  # planner task -> trl subcommand
DPO_KEYS = ("beta", "precompute_ref_log_probs", "loss_type", "ref_model_init_kwargs", "rpo_alpha", "sync_ref_model")
GRPO_KEYS = ("num_generations", "max_completion_length", "reward_funcs", "use_vllm", "num_iterations",
             "reward_weights", "steps_per_generation", "generation_batch_size")
RM_KEYS = ("center_rewards_coefficient",)
VLLM_NOTE = ("use_vllm: generation in vLLM (a server on other GPUs, or an engine beside training) is not modelled; the "
             "plan generates with transformers on the training GPU")
# peft's default LoRA targets for the catalog's architectures (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
PEFT_DEFAULT_TARGETS = "q_proj,v_proj"
# the plan fields a TRL config states (the others must hold their defaults to be exported)
EXPRESSES = ("model", "task", "method", "precision", "attn", "batch", "grad_accum", "grad_ckpt", "optimizer",
             "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "quant", "double_quant", "beta",
             "logprobs", "seq", "ref_logprobs", "group_size", "new_tokens", "kl_coef")
# the keys that state each plan field: a field none of them is in the file for holds TRL's default
STATED_BY = {
    "precision": ("bf16", "fp16", "dtype", "torch_dtype"), "batch": ("per_device_train_batch_size",),
    "grad_accum": ("gradient_accumulation_steps",), "grad_ckpt": ("gradient_checkpointing", "activation_checkpointing"),
    "optimizer": ("optim",), "seq": ("max_length", "max_seq_length"), "lora_rank": ("lora_r",), "lora_alpha": ("lora_alpha",),
    "lora_dropout": ("lora_dropout",), "lora_targets": ("lora_target_modules",), "quant": ("bnb_4bit_quant_type",),
    "double_quant": ("use_bnb_nested_quant",), "beta": ("beta",), "group_size": ("num_generations",),
    "new_tokens": ("max_completion_length",), "kl_coef": ("beta",),
}  # fmt: skip
SILENT = hf.TRAINER_SILENT | frozenset({
    "model_name_or_path", "dtype", "torch_dtype", "attn_implementation", "use_peft", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "lora_task_type", "use_rslora", "load_in_4bit", "load_in_8bit",
    "bnb_4bit_quant_type", "use_bnb_nested_quant", "packing", "packing_strategy", "max_length", "max_seq_length",
    "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "bf16", "fp16", "optim",
    "deepspeed", "fsdp", "fsdp_config", "beta", "precompute_ref_log_probs", "loss_type", "num_generations",
    "max_completion_length", "max_prompt_length", "reward_funcs", "center_rewards_coefficient", "disable_dropout",
    "model_init_kwargs", "ref_model_init_kwargs", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "epsilon", "epsilon_high", "scale_rewards", "log_completions", "num_completions_to_print", "mask_truncated_completions",
    "pad_to_multiple_of", "dataset_name", "label_smoothing", "use_weighting", "rpo_alpha", "reward_weights",
})  # fmt: skip


def looks_like(data: dict[str, Any]) -> bool:
    keys = set(data)
    return "model_name_or_path" in keys or bool(keys & {"per_device_train_batch_size", "use_peft", "lora_r", "max_length"})


def task_of(data: dict[str, Any]) -> str:
    keys = set(data)
    if keys & set(GRPO_KEYS):
        return "grpo"
    if keys & set(DPO_KEYS):
        return "dpo"
    if keys & set(RM_KEYS):
        return "rm"
    return "sft"


def read(data: dict[str, Any], name: str, path: Path | None = None, task: str | None = None,
         given: set[str] | None = None) -> Imported:
    r = Reader(data, name, skip=skipped(given, STATED_BY))
    out = Imported(source=name, format=FORMAT)
    task = task or task_of(data)
    if task not in TASKS:
        raise ConfigError(f"{name}: TRL's CLI has no trainer for task {task} (it has: {', '.join(TASKS)})")
    out.plan["task"] = task
    model = r.text("model_name_or_path")
    if model:
        out.plan["model"] = model
    dtype = r.choice("dtype", hf.DTYPES) if r.has("dtype") else r.choice("torch_dtype", hf.DTYPES, "fp32")
    out.plan["precision"] = hf.precision(r, dtype, bf16_default=True)
    attn = r.choice("attn_implementation", hf.ATTN)
    if attn is not None:
        out.plan["attn"] = attn
        if attn != r.raw("attn_implementation"):
            out.warnings.append(f"{name}: attn_implementation {r.raw('attn_implementation')} is priced as {attn} "
                                "(same memory: no attention matrix)")
    out.plan["batch"] = r.integer("per_device_train_batch_size", 8)
    out.plan["grad_accum"] = r.integer("gradient_accumulation_steps", 1)
    # transformers 5 renames it activation_checkpointing (the old name kept as a deprecated alias)
    ckpt = r.boolean("activation_checkpointing")
    old = r.boolean("gradient_checkpointing")
    if ckpt is not None and old is not None and ckpt != old:
        raise r.error("activation_checkpointing", f"{ckpt} while gradient_checkpointing is {old}")
    out.plan["grad_ckpt"] = next((v for v in (ckpt, old) if v is not None), True)
    out.plan["optimizer"] = r.choice("optim", hf.OPTIM, "adamw-fused")
    _peft(r, out)
    if task == "grpo":
        _grpo(r, out)
    else:
        length = r.integer("max_length", None) if r.has("max_length") else r.integer("max_seq_length", 1024)
        out.plan["seq"] = length
    if task == "dpo":
        out.plan["beta"] = r.number("beta", 0.1)
        if r.boolean("precompute_ref_log_probs", False):
            out.plan["ref_logprobs"] = "precomputed"
        out.plan["logprobs"] = "fused"  # TRL 1.16's DPOTrainer always patches in its fused LM head
    if task == "sft":
        out.warnings.append(
            f"{name}: TRL 1.16's SFTTrainer computes the loss with its fused LM head, without the full logits; the "
            "planner's sft step holds the logits (fp32 for the loss), so its peak is high by up to their size")
    if r.boolean("use_dora", False):
        raise r.error("use_dora", "DoRA is not modelled (LoRA and QLoRA are)")
    hf.trainer_layout(r, out, path)
    hf.defaults_weak(out, data, STATED_BY)
    left = r.leftover(SILENT)
    noted = [k for k in left if k in hf.NOT_MODELLED_NOTE]
    out.warnings += not_modelled(name, noted + [k for k in left if k not in noted])
    return out


def _peft(r: Reader, out: Imported) -> None:
    four = r.boolean("load_in_4bit", False)
    if r.boolean("load_in_8bit", False):
        raise r.error("load_in_8bit", "8-bit (LLM.int8) models are not modelled (modelled: load_in_4bit with use_peft)")
    peft = r.boolean("use_peft", False)
    if four and not peft:
        raise r.error("load_in_4bit", "a 4-bit model trains only through adapters: set use_peft: true")
    if not peft:
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
            r.consume(key)
        return
    out.plan["method"] = "qlora" if four else "lora"
    out.plan["lora_rank"] = r.integer("lora_r", 16)
    out.plan["lora_alpha"] = r.number("lora_alpha", 32.0)
    out.plan["lora_dropout"] = r.number("lora_dropout", 0.05)
    targets = r.raw("lora_target_modules")
    if targets is None:
        out.plan["lora_targets"] = PEFT_DEFAULT_TARGETS
    elif isinstance(targets, str):
        out.plan["lora_targets"] = targets
    else:
        out.plan["lora_targets"] = ",".join(str(t) for t in targets)
    if four:
        out.plan["quant"] = r.choice("bnb_4bit_quant_type", {"nf4": "nf4", "fp4": "fp4"}, "nf4")
        out.plan["double_quant"] = r.boolean("use_bnb_nested_quant", False)
    if r.raw("lora_modules_to_save"):
        raise r.error("lora_modules_to_save", "trained full copies beside the adapters are not modelled")


def _grpo(r: Reader, out: Imported) -> None:
    """TRL's per_device_train_batch_size counts completions; the planner's GRPO batch counts prompts, each
    with its group of num_generations completions on the same GPU."""
    group = r.integer("num_generations", 8, minimum=2)
    completions = out.plan["batch"]
    if completions % group:
        raise r.error("per_device_train_batch_size", f"{completions} completions do not hold whole groups of "
                                                     f"num_generations {group} (the planner's GRPO step keeps each "
                                                     "prompt's group on one GPU)")
    out.plan["batch"] = completions // group
    out.plan["group_size"] = group
    out.plan["new_tokens"] = r.integer("max_completion_length", 512)
    prompt = r.integer("max_prompt_length")
    if prompt is not None:
        out.plan["prompt_len"] = prompt
    else:
        out.warnings.append(f"{r.name}: TRL 1.16's GRPO prompts are as long as the dataset's: the plan's "
                            "prompt length is --prompt-len (default 512)")
    out.plan["kl_coef"] = r.number("beta", 0.0)
    if r.boolean("use_vllm", False):
        out.warnings.append(f"{r.name}: " + VLLM_NOTE)
    if out.plan["grad_accum"] > 1 or r.has("steps_per_generation"):
        out.warnings.append(f"{r.name}: TRL generates steps_per_generation micro-batches of completions at once "
                            "(default: gradient_accumulation_steps); the planner's GRPO step generates one micro-batch")
    r.consume("steps_per_generation", "generation_batch_size", "num_iterations")


def write(plan: Any, layout: dict[str, Any], deepspeed_file: str | None = None) -> dict[str, Any]:
    """The YAML for `trl TASK --config` (TASK: `subcommand(plan)`)."""
    if plan.task not in TASKS:
        raise ConfigError(f"trl: TRL's CLI has no trainer for task {plan.task} (it has: {', '.join(TASKS)})")
    dtype, half = {"fp32": ("float32", None), "bf16": ("bfloat16", "bf16"), "fp16": ("float16", "fp16"),
                   "mixed-bf16": ("float32", "bf16"), "mixed-fp16": ("float32", "fp16")}[plan.precision]
    out: dict[str, Any] = {
        "model_name_or_path": model_ref(plan.model),
        "dtype": dtype,
        "attn_implementation": plan.attn,
        "per_device_train_batch_size": plan.batch * (plan.group_size if plan.task == "grpo" else 1),
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_checkpointing": plan.grad_ckpt,
        "bf16": half == "bf16",
        "fp16": half == "fp16",
        "optim": hf.optim_out(plan.optimizer),
        "output_dir": "outputs",
    }
    if plan.task == "grpo":
        out.update(num_generations=plan.group_size, max_completion_length=plan.new_tokens, beta=plan.kl_coef)
        if plan.reward_model is not None:
            raise ConfigError("trl: a GRPO reward model goes in the training script (reward_funcs), not the config")
    else:
        out["max_length"] = plan.seq
    if plan.task == "rm":
        # RewardConfig's own key, at its default: the file then says which trainer reads it (task_of)
        out["center_rewards_coefficient"] = None
    if plan.task == "dpo":
        out["beta"] = plan.beta
        out["precompute_ref_log_probs"] = plan.ref_logprobs == "precomputed"
        if plan.logprobs != "fused":
            raise ConfigError(f"trl: TRL 1.16's DPOTrainer computes log-probabilities with its fused LM head "
                              f"(logprobs fused), not {plan.logprobs}")
    if plan.method in ("lora", "qlora"):
        out.update(use_peft=True, lora_r=plan.lora_rank, lora_alpha=hf.whole(plan.alpha), lora_dropout=plan.lora_dropout,
                   lora_target_modules=plan.lora_targets if plan.lora_targets == "all-linear" else plan.target_list)
    if plan.method == "qlora":
        out.update(load_in_4bit=True, bnb_4bit_quant_type=plan.quant, use_bnb_nested_quant=plan.double_quant)
    if deepspeed_file is not None:
        out["deepspeed"] = deepspeed_file
    if layout.get("fsdp"):
        out.update(fsdp_layout(layout))
    return out


def fsdp_layout(layout: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's FSDP keys of TrainingArguments (FSDP2: reshard_after_forward false is ZeRO-2's
    sharding, cpu_offload the parameters, gradients and the step on the CPU)."""
    if layout.get("offload", "none") == "optimizer":
        raise ConfigError("offload: FSDP offloads parameters and optimizer together (offload optimizer+params)")
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": layout["fsdp"] == "full-shard",
                                          "cpu_offload": layout.get("offload", "none") != "none"}}


def model_ref(model: str) -> str:
    """The hub id of a catalog model (what the tools load), else the path as given."""
    from planner.models import load_model

    spec = load_model(model)
    return spec.hf_id or model
