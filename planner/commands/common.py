"""What every command shares: output, the bad-input exception, exit codes, and the plan's flags.

Imports only the standard library at import time (the CLI's cold start); what a command needs it
imports when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# Flags whose values go into the Plan (dest == Plan field name). Defaults are None so that only
# flags the user actually typed count as given.
PLAN_FLAGS: tuple[str, ...] = (
    "model", "gpu", "gpu_memory", "task", "method", "precision", "optimizer", "grad_ckpt", "attn",
    "batch", "seq", "grad_accum", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
    "quant", "double_quant", "kbit_prep", "prompt_len", "new_tokens", "teacher", "teacher_method",
    "ref_logprobs", "beta", "reward_model", "value_model", "group_size", "kl_coef", "ppo_epochs", "mini_batch",
    "frozen_placement", "hard_label_weight", "logprobs", "pair_forward", "reference_pass",
)  # fmt: skip


LAYOUT_FLAGS: tuple[str, ...] = (
    "gpus", "gpus_per_node", "zero", "fsdp", "engine", "offload", "cpu_memory", "tp", "sp", "pp", "pp_schedule",
    "pp_chunks", "global_batch", "inter_node_gbps",
)


# the layout flags fit and export share: name -> (flag, argparse keywords)
LAYOUT_ARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpus": ("--gpus", dict(type=int, metavar="N", help="GPUs in the job (data parallel = gpus / (tp x pp))")),
    "gpus_per_node": ("--gpus-per-node", dict(type=int, metavar="N", help="GPUs per node (default: min(gpus, 8))")),
    "zero": ("--zero", dict(type=int, metavar="{0,1,2,3}", help="ZeRO stage (default: 0)")),
    "fsdp": ("--fsdp", dict(metavar="{full-shard,shard-grad-op}", help="torch FSDP sharding (ZeRO-3 / ZeRO-2 in torch)")),
    "offload": ("--offload", dict(metavar="{none,optimizer,optimizer+params}", help="ZeRO offload to CPU (default: none)")),
}


def add_layout_args(group: Any, names: tuple[str, ...]) -> None:
    for name in names:
        flag, kwargs = LAYOUT_ARGS[name]
        group.add_argument(flag, **kwargs)


class Out:
    def __init__(self, stdout: TextIO, stderr: TextIO):
        self.stdout = stdout
        self.stderr = stderr

    def print(self, *parts: Any) -> None:
        print(*parts, file=self.stdout)

    def warn(self, message: str) -> None:
        print(f"planner: warning: {message}", file=self.stderr)


class BadInput(Exception):
    """Raised by commands for bad input; main prints it as one line and exits 2."""


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan_file", nargs="?", metavar="PLAN.yaml", help="plan file (keys: the flag names below); flags override it")
    p.add_argument("--from", dest="from_configs", action="append", metavar="[FORMAT:]FILE",
                   help="read the plan from a config people train with (repeatable, the files combine): a TRL YAML, "
                        "an accelerate YAML, a DeepSpeed JSON, a LLaMA-Factory YAML or an axolotl YAML, told by its "
                        "keys or named (trl:, accelerate:, deepspeed:, llamafactory:, axolotl:); the plan file and "
                        "flags override it; keys the planner does not model are named in a warning")
    g = p.add_argument_group("model and card")
    g.add_argument("--model", "-m", metavar="M", help="catalog id (see `planner models`), a config.json, or a model directory")
    g.add_argument("--gpu", "-g", metavar="ID", help="catalog card (see `planner gpus`)")
    g.add_argument("--gpu-memory", metavar="SIZE", help="custom card memory, e.g. 24GiB (2^30) or 24GB (1e9); with --gpu, that card with this memory")
    g = p.add_argument_group("workload")
    g.add_argument("--task", metavar="T", help="technique: sft (a training step), generate, or a plugin's (see `planner plugins`; default: sft)")
    g.add_argument("--method", metavar="{full,lora,qlora}", help="full fine-tuning, LoRA or QLoRA (default: full)")
    g.add_argument("--precision", metavar="P", help="fp32, bf16, fp16, mixed-bf16, mixed-fp16 (default: bf16)")
    g.add_argument("--optimizer", metavar="O", help="adamw, adamw-fused, adamw-8bit, paged-adamw-8bit, sgd (default: adamw)")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None, help="gradient checkpointing (default: off)")
    g.add_argument("--attn", metavar="{sdpa,eager}", help="attention implementation (default: sdpa)")
    g.add_argument("--batch", "-b", type=int, metavar="N", help="sequences per micro-batch (default: 1)")
    g.add_argument("--seq", "-s", type=int, metavar="N", help="training sequence length in tokens (default: 2048)")
    g.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps (default: 1)")
    g = p.add_argument_group("LoRA / QLoRA (only with --method lora or qlora)")
    g.add_argument("--lora-rank", type=int, metavar="R", help="adapter rank (default: 16)")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="adapter alpha (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=float, metavar="P", help="adapter dropout (default: 0)")
    g.add_argument("--lora-targets", metavar="NAMES", help="'all-linear' or a comma list of module names (default: all-linear)")
    g.add_argument("--quant", metavar="{nf4,fp4}", help="4-bit type (default: nf4)")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None, help="double quantization, qlora only (default: on)")
    g.add_argument("--kbit-prep", action=argparse.BooleanOptionalAction, default=None, help="peft prepare_model_for_kbit_training, qlora only (default: on)")
    g = p.add_argument_group("generation (only with --task generate)")
    g.add_argument("--prompt-len", type=int, metavar="N", help="prompt tokens per sequence (default: 512)")
    g.add_argument("--new-tokens", type=int, metavar="N", help="generated tokens per sequence (default: 128)")
    g = p.add_argument_group("alignment and distillation (--task rm, dpo, ppo, grpo, distill)")
    g.add_argument("--teacher", metavar="M", help="distill: the frozen teacher (catalog id or config path; same vocabulary)")
    g.add_argument("--teacher-method", metavar="{full,qlora}", help="distill: how the teacher is held (default: full, bf16)")
    g.add_argument("--hard-label-weight", type=float, metavar="W", help="distill: weight of the hard-label loss mixed with KL (default: 0)")
    g.add_argument("--ref-logprobs", metavar="{model,precomputed}", help="dpo: a resident reference, or log-probs computed beforehand (default: model)")
    g.add_argument("--beta", type=float, metavar="B", help="dpo: beta of the loss (default: 0.1)")
    g.add_argument("--logprobs", metavar="{full,selective,fused}",
                   help="dpo: log_softmax over the full fp32 logits, TRL 1.16's selective_log_softmax over the logits, "
                        "or TRL 1.16's fused LM head (no logits) (default: full)")
    g.add_argument("--reference-pass", metavar="{after,before}",
                   help="dpo: score the reference after the policy's forward, its graph alive (TRL's order), or before it (default: after)")
    g.add_argument("--pair-forward", metavar="{concatenated,separate}",
                   help="rm/dpo: chosen and rejected in one forward (TRL), or in two forwards before one backward (default: concatenated)")
    g.add_argument("--reward-model", metavar="M", help="ppo/grpo: reward model (default: a reward function, no model)")
    g.add_argument("--value-model", metavar="M", help="ppo: value model (default: the policy's model)")
    g.add_argument("--group-size", type=int, metavar="G", help="grpo: completions per prompt, >= 2 (default: 8)")
    g.add_argument("--kl-coef", type=float, metavar="K", help="ppo/grpo: KL coefficient; 0 drops the reference (default: 0.04)")
    g.add_argument("--ppo-epochs", type=int, metavar="N", help="ppo: passes over each rollout (default: 1)")
    g.add_argument("--mini-batch", type=int, metavar="N", help="ppo: sequences per mini-batch (default: --batch)")
    g.add_argument("--frozen-placement", metavar="{resident,offload,separate}",
                   help="frozen models (reference, reward, teacher): on this GPU, offloaded to the CPU between their phases, or on other GPUs (default: resident)")


def file_values(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The plan settings and layout settings of the configs (`--from`) and the plan file, the plan
    file's winning (both empty without either). Read once per command (`config_warnings`)."""
    cached = getattr(args, "_file_values", None)
    if cached is not None:
        return cached
    from planner.plan_io import load_plan_file

    values: dict[str, Any] | None = None
    layout: dict[str, Any] = {}
    if getattr(args, "plan_file", None):
        values = load_plan_file(args.plan_file, extra_keys=LAYOUT_FLAGS)
        layout = {k: values.pop(k) for k in LAYOUT_FLAGS if k in values}
    warnings: list[str] = []
    if getattr(args, "from_configs", None):
        from planner.configs import read_configs

        flags = {name for name in PLAN_FLAGS if getattr(args, name, None) is not None}
        given = flags | set(values or {})
        chosen = {k: getattr(args, k, None) or (values or {}).get(k) for k in ("task", "method")}
        combined = read_configs(args.from_configs, given=given, **chosen)
        warnings = combined.warnings
        values = {**combined.plan, **(values or {})}
        layout = {**combined.layout, **layout}
    args._config_warnings = warnings
    args._file_values = (values, layout)
    return values, layout


def config_warnings(args: argparse.Namespace) -> list[str]:
    """The warnings of the configs read with `--from` (after plan_from_args or layout_fields)."""
    return list(getattr(args, "_config_warnings", []))


def plan_from_args(args: argparse.Namespace) -> Any:
    from planner.plan_io import build_plan

    flags = {name: getattr(args, name) for name in PLAN_FLAGS}
    from_file, _ = file_values(args)
    plan, _given = build_plan(from_file, flags)
    return plan


def layout_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Layout settings from the plan file, overridden by flags (sizes parsed, one-line errors)."""
    from planner.plan_io import layout_values

    _, fields = file_values(args)
    fields.update({k: getattr(args, k) for k in LAYOUT_FLAGS if getattr(args, k, None) is not None})
    return layout_values(fields)


ALLOC_CONF_HELP = ("caching-allocator settings in PYTORCH_CUDA_ALLOC_CONF syntax, e.g. 'expandable_segments:True' "
                   "(default: $PYTORCH_ALLOC_CONF or $PYTORCH_CUDA_ALLOC_CONF if set, else torch's defaults)")


def alloc_conf_from(args: argparse.Namespace):
    """--alloc-conf, else the environment torch reads (PYTORCH_ALLOC_CONF first, as torch does); bad
    settings raise PlanError (a ValueError: one line, exit 2)."""
    import os

    from planner.engine.alloc_conf import parse_alloc_conf

    text = args.alloc_conf
    if text is None:
        text = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return parse_alloc_conf(text)
