"""The plan: what the user asks the planner about, as a validated pydantic model.

Every field has the default the CLI documents. Options that only make sense with another option
(LoRA rank without LoRA, prompt length without generation) are rejected rather than ignored,
so a user never believes a flag did something it did not.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Method = Literal["full", "lora", "qlora"]
Precision = Literal["fp32", "bf16", "fp16", "mixed-bf16", "mixed-fp16"]
Attention = Literal["sdpa", "eager"]
Quant = Literal["nf4", "fp4"]

METHODS: tuple[str, ...] = ("full", "lora", "qlora")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "mixed-bf16", "mixed-fp16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw-fused", "adamw-8bit", "paged-adamw-8bit", "sgd")

# The largest count a plan may hold (batch, lengths, ranks...): every memory figure stays exact at any
# size (planner.engine.tape evaluates in rationals beyond float's exact range), but time and rates
# are floats, and 10^30 keeps their products (tokens x positions x bytes) far from float's 1e308.
MAX_COUNT = 10**30

LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
QLORA_FIELDS = ("quant", "double_quant", "kbit_prep")
# Fields that only some techniques read (each technique lists those it reads in `plan_fields`).
TECHNIQUE_FIELDS = ("seq", "grad_accum", "grad_ckpt", "optimizer", "prompt_len", "new_tokens", "teacher",
                    "teacher_method", "ref_logprobs", "beta", "reward_model", "value_model", "group_size",
                    "kl_coef", "ppo_epochs", "mini_batch", "frozen_placement", "hard_label_weight", "logprobs",
                    "pair_forward", "reference_pass")


class Plan(BaseModel):
    """One step of one workload on one GPU.

    `batch` is sequences per micro-batch per GPU. For `generate`, the sequence is
    `prompt_len` tokens of prompt plus `new_tokens` generated ones.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="catalog id, or path to a config.json / model directory")
    gpu: str | None = Field(default=None, description="catalog id of the card")
    gpu_memory: int | None = Field(default=None, gt=0, description="custom card: bytes CUDA reports as total")
    task: str = Field(default="sft", description="technique name (planner plugins lists them)")
    method: Method = "full"
    precision: Precision = "bf16"
    optimizer: str = Field(default="adamw", description="adamw, adamw-fused, adamw-8bit, paged-adamw-8bit, sgd, or a plugin's")
    grad_ckpt: bool = False
    attn: Attention = "sdpa"
    batch: int = Field(default=1, gt=0, le=MAX_COUNT)
    seq: int = Field(default=2048, gt=0, le=MAX_COUNT)
    grad_accum: int = Field(default=1, gt=0, le=MAX_COUNT)
    # LoRA / QLoRA (peft defaults where the issue names none)
    lora_rank: int = Field(default=16, gt=0, le=MAX_COUNT)
    lora_alpha: float | None = Field(default=None, gt=0, description="default 2 x rank")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_targets: str = Field(default="all-linear", description="'all-linear' or a comma list of module names")
    quant: Quant = "nf4"
    double_quant: bool = True
    kbit_prep: bool = True
    # generation
    prompt_len: int = Field(default=512, gt=0, le=MAX_COUNT)
    new_tokens: int = Field(default=128, gt=0, le=MAX_COUNT)
    # alignment and distillation (each technique reads the ones it lists in plan_fields)
    teacher: str | None = Field(default=None, description="distill: teacher model (catalog id or config path)")
    teacher_method: Method = Field(default="full", description="distill: how the teacher is held (full or qlora)")
    hard_label_weight: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="distill: weight of the hard-label cross-entropy mixed with the KL term (0: KL only)")
    ref_logprobs: Literal["model", "precomputed"] = Field(
        default="model", description="dpo: a resident reference model, or log-probs computed beforehand")
    beta: float = Field(default=0.1, gt=0, description="dpo: the loss's beta")
    pair_forward: Literal["concatenated", "separate"] = Field(
        default="concatenated",
        description="rm/dpo: chosen and rejected sequences in one forward of 2 x batch (TRL's trainers), or in "
                    "two forwards of batch each whose graphs both stay alive until one backward")
    reference_pass: Literal["after", "before"] = Field(
        default="after",
        description="dpo: the reference's no-grad forward after the policy's forward, while its graph is alive "
                    "(TRL's DPOTrainer order), or before it")
    logprobs: Literal["full", "selective", "fused"] = Field(
        default="full",
        description="dpo: how per-token log-probabilities are computed: full (log_softmax(logits.float()).gather "
                    "over the batch x seq x vocab logits), selective (TRL 1.16's selective_log_softmax over the "
                    "logits: its Triton kernel keeps only the logits) or fused (TRL 1.16's fused LM head, "
                    "add_fused_lm_head: the projection in 4096-token x 32768-vocabulary tiles, no logits)")
    reward_model: str | None = Field(default=None, description="ppo/grpo: reward model (else a reward function)")
    value_model: str | None = Field(default=None, description="ppo: value model (default: the policy's model)")
    group_size: int = Field(default=8, le=MAX_COUNT, description="grpo: completions per prompt (>= 2)")
    kl_coef: float = Field(default=0.04, ge=0, description="ppo/grpo: KL coefficient against the reference (0: no reference)")
    ppo_epochs: int = Field(default=1, gt=0, le=MAX_COUNT, description="ppo: passes over each rollout")
    frozen_placement: Literal["resident", "offload", "separate"] = Field(
        default="resident",
        description="dpo/ppo/grpo/distill: frozen models stay on the GPU (resident), move to the CPU between "
                    "the phases that use them (offload), or live on other GPUs (separate)")
    mini_batch: int | None = Field(default=None, gt=0, le=MAX_COUNT, description="ppo: sequences per training mini-batch (default: batch)")

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: str) -> str:
        if v in OPTIMIZERS:
            return v
        from planner.plugins import registry

        known = list(OPTIMIZERS) + sorted(registry(scan=True).optimizers)
        if v not in known:
            import difflib

            close = difflib.get_close_matches(v, known, n=3)
            hint = f"did you mean: {', '.join(close)}?" if close else f"choose from {', '.join(known)}"
            raise ValueError(f"optimizer: unknown optimizer '{v}' ({hint})")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        from planner.plugins import technique

        technique(v)  # unknown names raise with close matches
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"group_size: GRPO needs at least 2 completions per prompt to compare them (got {v})")
        return v

    @field_validator("lora_targets")
    @classmethod
    def _targets(cls, v: str) -> str:
        names = [t.strip() for t in v.split(",") if t.strip()]
        if not names:
            raise ValueError("lora_targets: give 'all-linear' or a comma list of module names")
        return ",".join(names)

    # ---- derived values -------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def target_list(self) -> list[str]:
        return self.lora_targets.split(",")

    @property
    def tokens_per_micro_batch(self) -> int:
        if self.task == "generate":
            return self.batch * (self.prompt_len + self.new_tokens)
        return self.batch * self.seq

    @property
    def weight_dtype(self) -> str:
        """dtype the model's (non-quantized) parameters are stored in."""
        return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "mixed-bf16": "fp32", "mixed-fp16": "fp32"}[
            self.precision
        ]

    @property
    def compute_dtype(self) -> str:
        """dtype matmuls run in (autocast dtype for mixed precision)."""
        return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "mixed-bf16": "bf16", "mixed-fp16": "fp16"}[
            self.precision
        ]

    @property
    def matmul_dtype(self) -> str:
        """dtype the model's large matmuls run in: the compute dtype, except QLoRA's 4-bit layers,
        which bitsandbytes computes in bf16 whatever the precision (the peak MFU is measured against)."""
        return "bf16" if self.method == "qlora" else self.compute_dtype

    @property
    def autocast(self) -> bool:
        """Whether the step runs under torch.autocast (mixed precision, and QLoRA's bf16 compute)."""
        return self.precision.startswith("mixed") or self.method == "qlora"


def check_applicable(plan: Plan, given: set[str]) -> None:
    """Reject options that the plan's method/task would silently ignore."""
    if plan.method == "full":
        bad = [f for f in LORA_FIELDS + QLORA_FIELDS if f in given]
        if bad:
            raise ValueError(f"{bad[0]}: only applies with method lora or qlora (method is full)")
    if plan.method == "lora":
        bad = [f for f in QLORA_FIELDS if f in given]
        if bad:
            raise ValueError(f"{bad[0]}: only applies with method qlora (method is lora)")
    from planner.plugins import registry, technique

    reads = set(technique(plan.task).plan_fields)
    if "kbit_prep" in given and "optimizer" not in reads:
        raise ValueError(f"kbit_prep: prepare_model_for_kbit_training prepares a 4-bit model for training, and task "
                         f"{plan.task} trains none (its 4-bit model keeps the load dtype)")
    bad = [f for f in TECHNIQUE_FIELDS if f in given and f not in reads]
    if bad:
        users = sorted(t.name for t in registry().techniques.values() if bad[0] in t.plan_fields)
        raise ValueError(f"{bad[0]}: only applies with task {' or '.join(users) or '(none)'} (task is {plan.task})")
