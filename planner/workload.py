"""What runs: the description a technique hands to the engine.

A workload names the models resident on the GPU, each with its role and how it is held (full,
LoRA, QLoRA; trainable or frozen), and the phases of one step, each a program kind the engine knows
how to turn into a memory timeline:

- `train_step`: forward with the causal-LM loss, backward, optimizer step (transformers' `labels=`);
- `generate`: transformers' greedy `generate` with its dynamic KV cache (prefill, then decode);
- `score`: a no-grad forward over full sequences followed by an fp32 log-softmax over the vocabulary
  and a gather of the tokens' log-probabilities (evaluation, reference log-probs);
- `forward`: a no-grad forward whose full logits the program keeps (a distillation teacher).

A `train_step` names its loss program (`planner.engine.heads`): causal_lm, logprobs, pairwise, kl.

Kept as frozen dataclasses rather than pydantic models: one is built per estimate, and an estimate
must stay well under a tenth of a millisecond. The user-facing spec (`Plan`) is validated by pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.architecture import ModelSpec
from planner.specs import Plan

PHASE_KINDS: tuple[str, ...] = ("train_step", "generate", "score", "forward")


@dataclass(frozen=True, slots=True)
class ModelUse:
    """One model on the GPU. `setup` carries how it is held: method, precision, LoRA and
    quantization options, optimizer (the `Plan` fields of the same names)."""

    role: str
    spec: ModelSpec
    setup: Plan
    trainable: bool
    ref: str = ""  # what the model was loaded from (catalog id or config path), for backends

    def __post_init__(self) -> None:
        # peft's prepare_model_for_kbit_training (fp32 casts of every non-quantized weight) is part of
        # preparing a 4-bit model for training: the programs apply it to the models they train only
        # (planner.backends.dryrun._build.prepare_for_plan), so a frozen or generating 4-bit model keeps the
        # load dtype.
        if not self.trainable and self.setup.method == "qlora" and self.setup.kbit_prep:
            object.__setattr__(self, "setup", self.setup.model_copy(update={"kbit_prep": False}))

    @property
    def source(self) -> str:
        return self.ref or self.spec.id


@dataclass(frozen=True, slots=True)
class Phase:
    """One program of the step. Sizes: `batch` sequences of `seq` tokens (for `generate`: `seq` is
    the prompt length and `new_tokens` the generated ones)."""

    name: str
    kind: str
    role: str
    batch: int
    seq: int
    new_tokens: int = 0
    loss: str = "causal_lm"
    # bytes per token of tensors an earlier phase of the step created and this phase's program
    # still references (a teacher's logits during the student's step)
    carried: int = 0
    # False when the phase runs a peft model with its adapters disabled (a LoRA policy as its own
    # reference): the adapters stay resident but none of their operations run
    adapters: bool = True
    # train_step: forwards of `batch` sequences each before one backward (2: a preference pair's
    # chosen and rejected sequences in two forwards)
    passes: int = 1
    # how many times the phase runs in one step: the step's micro-batches (gradient accumulation:
    # every phase once per micro-batch, the optimizer once at the end, the gradients held between)
    micro_batches: int = 1
    # train_step with micro_batches > 1: the previous micro-batch's outputs stay bound until this
    # phase's forward returns (`out = model(...)` rebinds them); False where the program lets them
    # go before it (DPO's `outputs = []`)
    keeps_previous: bool = True
    # with micro_batches > 1, a phase that runs before the step's train_step phase: the name of that
    # phase, whose previous micro-batch's bound outputs (what it holds, and what it carried) the
    # program rebinds only after this phase (a teacher's and a student's logits, a policy's outputs)
    previous: str | None = None
    # the name of a train_step phase whose forward graph (what its backward needs, and the
    # outputs its program binds) stays alive while this phase runs (a reference scored after the
    # policy's forward)
    during: str | None = None
    # score/forward: whether the program runs this phase inside the plan's autocast region (TRL
    # scores the DPO reference inside compute_loss, under autocast)
    autocast: bool = False
    # train_step: the ops the technique's loss program dispatches on per-sequence values after the
    # head (DPO's log-ratio arithmetic and logsigmoid, a reward model's pairwise loss): (kind, aten
    # name, backward ops as "kind:name" joined by ","), in program order; the step's final
    # `loss.backward()` adds its ones_like
    loss_ops: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Workload:
    technique: str
    models: tuple[ModelUse, ...]
    phases: tuple[Phase, ...]

    def phase(self, name: str) -> Phase:
        for ph in self.phases:
            if ph.name == name:
                return ph
        raise KeyError(f"workload of {self.technique} has no phase '{name}'")

    def model(self, role: str) -> ModelUse:
        for m in self.models:
            if m.role == role:
                return m
        raise KeyError(f"workload of {self.technique} has no model with role '{role}'")
