"""Built-in alignment techniques: `rm` (reward model) and `dpo`.

`--batch` counts preference pairs, as TRL's per_device_train_batch_size does. With
`--pair-forward concatenated` (the default, what TRL 1.16.0's DPOTrainer and RewardTrainer do) each
step runs the chosen and the rejected sequences of every pair in one forward (chosen first),
2 x batch sequences; with `separate` the chosen and the rejected sequences go through two forwards
of batch sequences each, both graphs kept until one backward.

Programs (shared/notes/heldout-protocol.md; what the estimate models and the backends execute):
- rm: AutoModelForSequenceClassification(num_labels=1); rewards = model(ids).logits;
  loss = -logsigmoid(r_chosen - r_rejected).mean().
- dpo: the policy's forward, then a frozen reference (a second copy in bf16; with LoRA/QLoRA the
  policy with its adapters disabled; or log-probs computed beforehand) scored under no_grad and the
  plan's autocast while the policy's graph is alive, as TRL 1.16.0's DPOTrainer orders them
  (`--reference-pass before`: the reference first, a hand-written loop's other order); loss = -logsigmoid(beta * ((pc - pr) - (rc - rr))).mean(). Log-probs (`--logprobs`,
  planner_plugins.logprobs): `full` = log_softmax(logits.float()).gather(ids) summed per sequence
  (the held-out protocol's hand-written program), `selective` = TRL 1.16.0's selective_log_softmax
  over the logits, `fused` = TRL 1.16.0's fused LM head, as its DPOTrainer calls it.
"""

from __future__ import annotations

from planner.architecture import seq_cls_spec
from planner.hookspecs import hookimpl
from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload
from planner_plugins.logprobs import POLICY_OUTPUTS, REFERENCE_OUTPUTS, sequence_logprobs

__version__ = "0.1.0"


def _pair_rows(plan) -> tuple[int, int]:
    """Sequences per forward and forwards per step: one of chosen-then-rejected, or one of each."""
    return (2 * plan.batch, 1) if plan.pair_forward == "concatenated" else (plan.batch, 2)


def _pair_forward(fn, ids, plan):
    """`fn` over chosen-then-rejected `ids`: one call on all rows, or one per half, concatenated."""
    import torch

    if plan.pair_forward == "concatenated":
        return fn(ids)
    return torch.cat([fn(ids[: plan.batch]), fn(ids[plan.batch:])])


# the programs' ops on per-sequence values after the head (planner.workload.Phase.loss_ops)
RM_LOSS_OPS = (  # rewards = logits.squeeze(-1); -logsigmoid(rewards[:B] - rewards[B:]).mean()
    ("view", "squeeze", "view:unsqueeze"), ("view", "slice", "elementwise:slice_backward"),
    ("view", "slice", "elementwise:slice_backward,elementwise:add"), ("elementwise", "sub", "elementwise:neg"),
    ("elementwise", "log_sigmoid_forward", "elementwise:log_sigmoid_backward"),
    ("elementwise", "mean", "view:expand,elementwise:div"), ("elementwise", "neg", "elementwise:neg"),
)
# -logsigmoid(beta * ((pc - rc) - (pr - rr))).mean() over the policy's and the reference's
# chosen/rejected halves (four slices; the policy's two send gradients)
SEQUENCE_SUM = (("elementwise", "sum", "view:unsqueeze,view:expand"),)  # log-probs summed per sequence
DPO_LOSS_OPS = SEQUENCE_SUM + (
    ("view", "slice", "elementwise:slice_backward"), ("view", "slice", "elementwise:slice_backward,elementwise:add"),
    ("view", "slice", ""), ("view", "slice", ""), ("elementwise", "sub", ""), ("elementwise", "sub", ""),
    ("elementwise", "sub", "elementwise:neg"), ("elementwise", "mul", "elementwise:mul"),
    ("elementwise", "log_sigmoid_forward", "elementwise:log_sigmoid_backward"),
    ("elementwise", "neg", "elementwise:neg"), ("elementwise", "mean", "view:expand,elementwise:div"),
)


def rm_workload(plan, model) -> Workload:
    rows, passes = _pair_rows(plan)
    return Workload(
        technique="rm",
        models=(ModelUse("model", seq_cls_spec(model), plan, trainable=True, ref=plan.model),),
        phases=(Phase("train", "train_step", "model", rows, plan.seq, loss="pairwise", passes=passes,
                      loss_ops=RM_LOSS_OPS, micro_batches=plan.grad_accum),),
    )


def rm_step(ctx) -> None:
    import torch.nn.functional as F

    p = ctx.plan
    model, opt = ctx.model("model"), ctx.optimizer("model")
    for _ in range(p.grad_accum):  # micro-batches, as sft's step runs them (the step's locals rebound)
        ids = ctx.token_ids(2 * p.batch, p.seq)  # chosen, then rejected
        ctx.keep(ids, "ids")
        with ctx.phase("forward"):
            rewards = _pair_forward(lambda x: model(input_ids=x).logits.squeeze(-1), ids, p)
            ctx.keep(rewards, "rewards")
            loss = -F.logsigmoid(rewards[: p.batch] - rewards[p.batch:]).mean()
            ctx.keep(loss, "loss")
        with ctx.phase("backward"):
            ctx.backward(loss)
        del ids, rewards, loss  # held by ctx.keep
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def dpo_workload(plan, model) -> Workload:
    policy = ModelUse("policy", model, plan, trainable=True, ref=plan.model)
    rows, passes = _pair_rows(plan)
    fused = plan.logprobs == "fused"
    head = {"full": "logprobs", "selective": "selective", "fused": "fused"}[plan.logprobs]
    # a step of grad_accum micro-batches; the step's `outputs = []` lets the previous micro-batch's
    # outputs go before the policy's forward, so only a reference scored before it sees them
    accum = dict(micro_batches=plan.grad_accum)
    before = "policy" if plan.reference_pass == "before" else None
    train = Phase("policy", "train_step", "policy", rows, plan.seq, loss=head, passes=passes, loss_ops=DPO_LOSS_OPS,
                  keeps_previous=False, **accum)
    models = [policy]
    # after: the reference runs while the policy's forward graph is alive (TRL's order)
    after = "policy" if plan.reference_pass == "after" else None
    reference = None
    if plan.ref_logprobs == "model":
        if plan.method == "full":
            ref_setup = plan.model_copy(update={"precision": "bf16" if plan.precision != "fp16" else "fp16"})
            models.append(ModelUse("reference", model, ref_setup, trainable=False, ref=plan.model))
            reference = Phase("reference", "score", "reference", rows, plan.seq, loss_ops=SEQUENCE_SUM,
                              loss="fused_logprobs" if fused else head, passes=passes, during=after,
                              autocast=True, previous=before, **accum)
        else:  # the base model with the adapters disabled: no second copy (the policy's fused head)
            reference = Phase("reference", "score", "policy", rows, plan.seq, loss=head, loss_ops=SEQUENCE_SUM,
                              adapters=False, passes=passes, during=after, autocast=True, previous=before, **accum)
    phases = [train] if reference is None else [train, reference] if after else [reference, train]
    return Workload(technique="dpo", models=tuple(models), phases=tuple(phases))


def dpo_step(ctx) -> None:
    import contextlib

    # TRL's log-prob functions run their own CUDA kernels on a GPU (emulated on CPU backends)
    with ctx.device_kernels("trl") if ctx.plan.logprobs != "full" else contextlib.nullcontext():
        _dpo_step(ctx)


def _dpo_step(ctx) -> None:
    p = ctx.plan
    policy, opt = ctx.model("policy"), ctx.optimizer("policy")
    for _ in range(p.grad_accum):  # micro-batches, as sft's step runs them (the step's locals rebound)
        _dpo_micro_batch(ctx, policy)
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def _dpo_micro_batch(ctx, policy) -> None:
    """One micro-batch's forward and backward; what the step binds is kept in ctx slots (a loop's
    locals: rebound by the next micro-batch, released when the step ends)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    p = ctx.plan
    ids = ctx.token_ids(2 * p.batch, p.seq)
    ctx.keep(ids, "ids")

    def reference_logprobs():
        # under no_grad and the plan's autocast: the HF Trainer runs compute_loss, the reference's
        # forward included, inside autocast
        with ctx.phase("reference"), torch.no_grad(), ctx.autocast():
            if p.ref_logprobs == "precomputed":
                return torch.zeros(2 * p.batch, device=ids.device)
            if p.method == "full":
                reference = ctx.model("reference")
                return _pair_forward(lambda x: sequence_logprobs(reference, x, p.logprobs, REFERENCE_OUTPUTS)[0],
                                     ids, p)
            with policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext():
                return _pair_forward(lambda x: sequence_logprobs(policy, x, p.logprobs, POLICY_OUTPUTS)[0], ids, p)

    if p.reference_pass == "before":
        ref = reference_logprobs()
        ctx.keep(ref, "ref")
    with ctx.phase("forward"):
        outputs: list = []  # the model outputs stay bound through the step, as in TRL's compute_loss
        ctx.keep(outputs, "outputs")  # `outputs = []`: the previous micro-batch's go before the forward

        def policy_logprobs(x):
            lp, out = sequence_logprobs(policy, x, p.logprobs, POLICY_OUTPUTS)
            outputs.append(out)
            return lp

        pol = _pair_forward(policy_logprobs, ids, p)
        ctx.keep(pol, "pol")
        if p.reference_pass == "after":  # TRL 1.16.0's _compute_loss: the policy, then the reference
            ref = reference_logprobs()
            ctx.keep(ref, "ref")
        margin = (pol[: p.batch] - pol[p.batch:]) - (ref[: p.batch] - ref[p.batch:])
        ctx.keep(margin, "margin")
        loss = -F.logsigmoid(p.beta * margin).mean()
        ctx.keep(loss, "loss")
    with ctx.phase("backward"):
        ctx.backward(loss)


RM = Technique(
    name="rm", kind="alignment",
    description="reward model: sequence-classification head, pairwise loss on chosen and rejected",
    workload=rm_workload, step=rm_step, plan_fields=("seq", "grad_accum", "grad_ckpt", "optimizer", "pair_forward"),
)
DPO = Technique(
    name="dpo", kind="alignment",
    description="direct preference optimization: trainable policy, frozen reference (or adapters off)",
    workload=dpo_workload, step=dpo_step,
    plan_fields=("seq", "grad_accum", "grad_ckpt", "optimizer", "ref_logprobs", "beta", "frozen_placement",
                 "logprobs", "pair_forward", "reference_pass"),
)


@hookimpl
def register_techniques(register) -> None:
    register(RM)
    register(DPO)
