"""Built-in alignment techniques: `rm` (reward model) and `dpo`.

`--batch` counts preference pairs, as TRL's per_device_train_batch_size does: each step runs the
chosen and the rejected sequences of every pair in one batch (chosen first), 2 x batch sequences.

Programs (shared/notes/heldout-protocol.md; what the estimate models and the backends execute):
- rm: AutoModelForSequenceClassification(num_labels=1); rewards = model(ids).logits;
  loss = -logsigmoid(r_chosen - r_rejected).mean().
- dpo: a frozen reference (a second copy in bf16; with LoRA/QLoRA the policy with its adapters
  disabled; or log-probs computed beforehand) scored under no_grad, then the policy; log-probs are
  log_softmax(logits.float()).gather(ids) summed per sequence (a full log-softmax, not TRL's
  selective one); loss = -logsigmoid(beta * ((pc - pr) - (rc - rr))).mean().
"""

from __future__ import annotations

from planner.architecture import seq_cls_spec
from planner.hookspecs import hookimpl
from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload

__version__ = "0.1.0"


def rm_workload(plan, model) -> Workload:
    return Workload(
        technique="rm",
        models=(ModelUse("model", seq_cls_spec(model), plan, trainable=True, ref=plan.model),),
        phases=(Phase("train", "train_step", "model", 2 * plan.batch, plan.seq, loss="pairwise"),),
    )


def rm_step(ctx) -> None:
    import torch.nn.functional as F

    p = ctx.plan
    model, opt = ctx.model("model"), ctx.optimizer("model")
    ids = ctx.token_ids(2 * p.batch, p.seq)  # chosen, then rejected
    with ctx.phase("forward"):
        rewards = model(input_ids=ids).logits.squeeze(-1)
        loss = -F.logsigmoid(rewards[: p.batch] - rewards[p.batch:]).mean()
    with ctx.phase("backward"):
        loss.backward()
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def dpo_workload(plan, model) -> Workload:
    policy = ModelUse("policy", model, plan, trainable=True, ref=plan.model)
    rows = 2 * plan.batch
    phases = [Phase("policy", "train_step", "policy", rows, plan.seq, loss="logprobs")]
    models = [policy]
    if plan.ref_logprobs == "model":
        if plan.method == "full":
            ref_setup = plan.model_copy(update={"precision": "bf16" if plan.precision != "fp16" else "fp16"})
            models.append(ModelUse("reference", model, ref_setup, trainable=False, ref=plan.model))
            phases.insert(0, Phase("reference", "score", "reference", rows, plan.seq))
        else:  # the base model with the adapters disabled: no second copy
            phases.insert(0, Phase("reference", "score", "policy", rows, plan.seq))
    return Workload(technique="dpo", models=tuple(models), phases=tuple(phases))


def _sequence_logprobs(logits, ids):
    import torch

    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1).sum(-1)


def dpo_step(ctx) -> None:
    import contextlib

    import torch
    import torch.nn.functional as F

    p = ctx.plan
    policy, opt = ctx.model("policy"), ctx.optimizer("policy")
    ids = ctx.token_ids(2 * p.batch, p.seq)
    with ctx.phase("reference"), torch.no_grad():
        if p.ref_logprobs == "precomputed":
            ref = torch.zeros(2 * p.batch, device=ids.device)
        elif p.method == "full":
            ref = _sequence_logprobs(ctx.model("reference")(input_ids=ids, use_cache=False).logits, ids)
        else:
            with policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext():
                ref = _sequence_logprobs(policy(input_ids=ids, use_cache=False).logits, ids)
    with ctx.phase("forward"):
        pol = _sequence_logprobs(policy(input_ids=ids).logits, ids)
        margin = (pol[: p.batch] - pol[p.batch:]) - (ref[: p.batch] - ref[p.batch:])
        loss = -F.logsigmoid(p.beta * margin).mean()
    with ctx.phase("backward"):
        loss.backward()
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


RM = Technique(
    name="rm", kind="alignment",
    description="reward model: sequence-classification head, pairwise loss on chosen and rejected",
    workload=rm_workload, step=rm_step, plan_fields=("seq", "grad_accum", "grad_ckpt", "optimizer"),
)
DPO = Technique(
    name="dpo", kind="alignment",
    description="direct preference optimization: trainable policy, frozen reference (or adapters off)",
    workload=dpo_workload, step=dpo_step,
    plan_fields=("seq", "grad_accum", "grad_ckpt", "optimizer", "ref_logprobs", "beta", "frozen_placement"),
)


@hookimpl
def register_techniques(register) -> None:
    register(RM)
    register(DPO)
