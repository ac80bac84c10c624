"""Built-in RL techniques: `ppo` and `grpo`. Each step alternates a rollout (generation with the KV
cache) and training, with several models resident at once.

- grpo: `--batch` prompts, each with `--group-size G` completions of `--new-tokens`; rewards from a
  reward model (`--reward-model`) or a deterministic function; group-relative advantages
  (r - mean) / (std + 1e-4) per group (TRL's GRPOTrainer, unbiased std); no value model; a frozen
  reference for the per-token KL (k3 estimator) unless `--kl-coef 0`; one policy update per rollout,
  so the old log-probs are the current ones detached.
- ppo: policy, value model (a one-score head on every position), frozen reference and reward model;
  rollout, then reward, reference and old log-probs/values, then `--ppo-epochs` passes over
  `--mini-batch`-sized chunks: the clipped objective ratio = exp(new - old),
  loss = -mean(min(ratio A, clamp(ratio, 1 - eps, 1 + eps) A)), the KL penalty against the
  reference folded into the per-token rewards, and the value loss (MSE to the returns).
TRL ships no PPO trainer in current releases: the PPO loop is ours, with the objective above.
With LoRA or QLoRA the reference is the policy with its adapters disabled.
"""

from __future__ import annotations

from planner.architecture import seq_cls_spec
from planner.hookspecs import hookimpl
from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload

__version__ = "0.1.0"
CLIP_EPS = 0.2


class RLError(ValueError):
    pass


# ---- the objectives (numerically tested on fixed tensors) --------------------------------------
def grpo_advantages(rewards, group_size: int, eps: float = 1e-4):
    """(r - mean(r)) / (std(r) + eps) over each group of `group_size` consecutive completions."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def ppo_clipped_loss(logp_new, logp_old, advantages, eps: float = CLIP_EPS):
    """-mean(min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A)), ratio = exp(new - old)."""
    import torch

    ratio = torch.exp(logp_new - logp_old)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps, 1 + eps) * advantages).mean()


def token_logprobs(logits, ids):
    """Log-probability of each next token (a full fp32 log-softmax, then a gather)."""
    import torch

    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def reward_function(seqs):
    """A deterministic reward when no reward model is given: the fraction of even token ids."""
    return (seqs % 2 == 0).float().mean(dim=-1)


# ---- the programs' ops on per-token values after the head (planner.workload.Phase.loss_ops) -------
# token_logprobs: logits[:, :-1] and ids[:, 1:] (two slices; the logits' sends a gradient)
TOKEN_SLICES = (("view", "slice", "elementwise:slice_backward"), ("view", "slice", ""))
# exp(logp - logp.detach()) * adv[:, None]; exp saves its output (detached here and in backward)
GRPO_RATIO_OPS = (
    ("view", "detach", ""), ("elementwise", "sub", ""), ("elementwise", "exp", "view:detach,elementwise:mul"),
    ("view", "detach", ""), ("view", "unsqueeze", ""), ("elementwise", "mul", "elementwise:mul"),
)
# - kl * (exp(ref - logp) - (ref - logp) - 1)
GRPO_KL_OPS = (
    ("elementwise", "sub", "elementwise:neg"), ("elementwise", "exp", "view:detach,elementwise:mul"),
    ("view", "detach", ""), ("elementwise", "sub", "elementwise:neg,elementwise:add"),
    ("elementwise", "sub", "elementwise:neg,elementwise:add"), ("elementwise", "sub", ""),
    ("elementwise", "mul", "elementwise:mul"), ("elementwise", "sub", "elementwise:neg"),
)
# prompts.repeat_interleave(G, dim=0): unsqueeze, expand, clone, view
REPEAT_OPS = (("view", "unsqueeze", ""), ("view", "expand", ""), ("elementwise", "clone", ""), ("view", "view", ""))
# reward_function: (seqs % 2 == 0).float().mean(-1)
REWARD_FN_OPS = tuple(("elementwise", n, "") for n in ("remainder", "eq", "_to_copy", "mean"))
# grpo_advantages: view, mean, std, (r - mean) / (std + eps), view
ADVANTAGE_OPS = (("view", "view", ""),) + tuple(("elementwise", n, "") for n in ("mean", "std", "sub", "add", "div")) + (
    ("view", "view", ""),)
# a score model's output: .logits[:, 0].float()
SCORE_OPS = (("view", "select", ""), ("elementwise", "_to_copy", ""))
# rewards = score - kl * (old - ref).sum(-1); adv = rewards - old_values; normalised
PPO_ADVANTAGE_OPS = tuple(("elementwise", n, "") for n in ("sub", "sum", "mul", "sub", "sub", "mean", "std", "sub",
                                                          "add", "div"))
# ppo_clipped_loss(logp, old[sl], adv[sl, None]): ratio = exp(logp - old); -min(ratio A, clamp(ratio) A).mean();
# the backward of min and clamp (where/masks), as the dry run records it, on the last op
PPO_LOSS_OPS = TOKEN_SLICES + (
    ("view", "slice", ""), ("view", "slice", ""), ("view", "unsqueeze", ""), ("elementwise", "sub", ""),
    ("elementwise", "exp", "view:detach,elementwise:mul"), ("view", "detach", ""), ("elementwise", "mul", "elementwise:mul"),
    ("elementwise", "clamp", "elementwise:ge,elementwise:le,elementwise:logical_and_,elementwise:where"),
    ("elementwise", "mul", "elementwise:mul"), ("elementwise", "minimum", ",".join(
        ["elementwise:eq", "elementwise:eq", "elementwise:gt", "elementwise:lt", "elementwise:masked_fill_",
         "elementwise:masked_fill_", "elementwise:scalar_tensor", "elementwise:where", "elementwise:where",
         "elementwise:div", "elementwise:div", "elementwise:add"])),
    ("elementwise", "mean", "view:expand,elementwise:div"), ("elementwise", "neg", "elementwise:neg"),
)
# v = value(seqs[sl]).logits[:, 0].float(); mse_loss(v, rewards[sl])
VALUE_LOSS_OPS = (("view", "slice", ""), ("view", "select", "elementwise:select_backward"),
                  ("elementwise", "_to_copy", "elementwise:_to_copy"), ("view", "slice", ""),
                  ("elementwise", "mse_loss", "elementwise:mse_loss_backward"))
# -per_token[:, prompt - 1:].mean()
GRPO_MEAN_OPS = (("view", "slice", "elementwise:slice_backward"), ("elementwise", "mean", "view:expand,elementwise:div"),
                 ("elementwise", "neg", "elementwise:neg"))


# ---- workloads -----------------------------------------------------------------------------------
def _frozen(plan):
    return plan.model_copy(update={"method": "full", "precision": "bf16" if plan.precision != "fp16" else "fp16",
                                   "grad_ckpt": False})


def _load(ref: str, what: str):
    from planner.models import load_model

    try:
        return load_model(ref)
    except ValueError as e:
        raise RLError(f"{what}: {str(e).split(': ', 1)[-1]}") from None


def grpo_workload(plan, model) -> Workload:
    rows, total = plan.batch * plan.group_size, plan.prompt_len + plan.new_tokens
    models = [ModelUse("policy", model, plan, trainable=True, ref=plan.model)]
    around = REPEAT_OPS + (() if plan.reward_model else REWARD_FN_OPS) + ADVANTAGE_OPS
    phases = [Phase("rollout", "generate", "policy", rows, plan.prompt_len, plan.new_tokens, loss_ops=around)]
    if plan.reward_model:
        rm = seq_cls_spec(_load(plan.reward_model, "reward_model"))
        models.append(ModelUse("reward", rm, _frozen(plan), trainable=False, ref=plan.reward_model))
        phases.append(Phase("reward", "forward", "reward", rows, total))
    if plan.kl_coef > 0:
        if plan.method == "full":
            models.append(ModelUse("reference", model, _frozen(plan), trainable=False, ref=plan.model))
            phases.append(Phase("reference", "score", "reference", rows, total, loss_ops=TOKEN_SLICES))
        else:
            phases.append(Phase("reference", "score", "policy", rows, total, adapters=False, loss_ops=TOKEN_SLICES))
    grpo_ops = TOKEN_SLICES + GRPO_RATIO_OPS + (GRPO_KL_OPS if plan.kl_coef > 0 else ()) + GRPO_MEAN_OPS
    phases.append(Phase("train", "train_step", "policy", rows, total, loss="logprobs", loss_ops=grpo_ops))
    return Workload(technique="grpo", models=tuple(models), phases=tuple(phases))


def ppo_workload(plan, model) -> Workload:
    if not plan.reward_model:
        raise RLError("reward_model: ppo needs --reward-model MODEL (a sequence-classification model is built from it)")
    total = plan.prompt_len + plan.new_tokens
    mini = plan.mini_batch or plan.batch
    if mini > plan.batch or plan.batch % mini:
        raise RLError(f"mini_batch: must divide the batch of {plan.batch} rollouts (got {mini})")
    rm = seq_cls_spec(_load(plan.reward_model, "reward_model"))
    value = seq_cls_spec(_load(plan.value_model, "value_model") if plan.value_model else model)
    models = [
        ModelUse("policy", model, plan, trainable=True, ref=plan.model),
        ModelUse("value", value, plan, trainable=True, ref=plan.value_model or plan.model),
        ModelUse("reward", rm, _frozen(plan), trainable=False, ref=plan.reward_model),
    ]
    phases = [
        Phase("rollout", "generate", "policy", plan.batch, plan.prompt_len, plan.new_tokens),
        Phase("reward", "forward", "reward", plan.batch, total, loss_ops=SCORE_OPS),
        Phase("old_logprobs", "score", "policy", plan.batch, total, loss_ops=TOKEN_SLICES),
        Phase("old_values", "forward", "value", plan.batch, total, loss_ops=SCORE_OPS + PPO_ADVANTAGE_OPS),
    ]
    if plan.kl_coef > 0:
        if plan.method == "full":
            models.append(ModelUse("reference", model, _frozen(plan), trainable=False, ref=plan.model))
            phases.append(Phase("reference", "score", "reference", plan.batch, total, loss_ops=TOKEN_SLICES))
        else:
            phases.append(Phase("reference", "score", "policy", plan.batch, total, adapters=False,
                                loss_ops=TOKEN_SLICES))
    phases += [
        Phase("policy_train", "train_step", "policy", mini, total, loss="logprobs",
              loss_ops=(("view", "slice", ""),) + PPO_LOSS_OPS),
        Phase("value_train", "train_step", "value", mini, total, loss="pairwise", loss_ops=VALUE_LOSS_OPS),
    ]
    return Workload(technique="ppo", models=tuple(models), phases=tuple(phases))


# ---- steps (executed by the backends) -------------------------------------------------------------
def _rollout(ctx, policy, prompts, new_tokens):
    was_training = policy.training
    policy.eval()  # generation with the KV cache (HF disables the cache under checkpointing in training)
    try:
        with ctx.phase("rollout"):
            return ctx.generate(policy, prompts, new_tokens)
    finally:
        policy.train(was_training)


def _reference_logprobs(ctx, seqs):
    import contextlib

    import torch

    p = ctx.plan
    with ctx.phase("reference"), torch.no_grad():
        if p.method == "full":
            return token_logprobs(ctx.model("reference")(input_ids=seqs, use_cache=False).logits, seqs)
        policy = ctx.model("policy")
        with policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext():
            return token_logprobs(policy(input_ids=seqs, use_cache=False).logits, seqs)


def grpo_step(ctx) -> None:
    import torch

    p = ctx.plan
    policy, opt = ctx.model("policy"), ctx.optimizer("policy")
    prompts = ctx.token_ids(p.batch, p.prompt_len).repeat_interleave(p.group_size, dim=0)
    seqs = _rollout(ctx, policy, prompts, p.new_tokens)
    with ctx.phase("reward"), torch.no_grad():
        if p.reward_model:
            rewards = ctx.model("reward")(input_ids=seqs, use_cache=False).logits[:, 0].float()
        else:
            rewards = reward_function(seqs)
    adv = grpo_advantages(rewards, p.group_size)
    ref = _reference_logprobs(ctx, seqs) if p.kl_coef > 0 else None
    with ctx.phase("forward"):
        logp = token_logprobs(policy(input_ids=seqs).logits, seqs)
        per_token = torch.exp(logp - logp.detach()) * adv[:, None]
        if ref is not None:
            per_token = per_token - p.kl_coef * (torch.exp(ref - logp) - (ref - logp) - 1)
        loss = -per_token[:, p.prompt_len - 1:].mean()
    with ctx.phase("backward"):
        loss.backward()
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def ppo_step(ctx) -> None:
    import torch
    import torch.nn.functional as F

    p = ctx.plan
    policy, value = ctx.model("policy"), ctx.model("value")
    popt, vopt = ctx.optimizer("policy"), ctx.optimizer("value")
    seqs = _rollout(ctx, policy, ctx.token_ids(p.batch, p.prompt_len), p.new_tokens)
    with ctx.phase("reward"), torch.no_grad():
        score = ctx.model("reward")(input_ids=seqs, use_cache=False).logits[:, 0].float()
    with ctx.phase("old_logprobs"), torch.no_grad():
        old = token_logprobs(policy(input_ids=seqs, use_cache=False).logits, seqs)
    with ctx.phase("old_values"), torch.no_grad():
        old_values = value(input_ids=seqs, use_cache=False).logits[:, 0].float()
    ref = _reference_logprobs(ctx, seqs) if p.kl_coef > 0 else torch.zeros_like(old)
    rewards = score - p.kl_coef * (old - ref).sum(-1)  # the KL penalty folded into the rewards
    adv = rewards - old_values
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) if adv.numel() > 1 else adv
    mini = p.mini_batch or p.batch
    for _ in range(p.ppo_epochs):
        for start in range(0, p.batch, mini):
            sl = slice(start, start + mini)
            with ctx.phase("forward"):
                logp = token_logprobs(policy(input_ids=seqs[sl]).logits, seqs[sl])
                loss = ppo_clipped_loss(logp, old[sl], adv[sl, None])
            with ctx.phase("backward"):
                loss.backward()
            with ctx.phase("optimizer"):
                popt.step()
                popt.zero_grad(set_to_none=True)
            with ctx.phase("value_forward"):
                v = value(input_ids=seqs[sl]).logits[:, 0].float()
                vloss = F.mse_loss(v, rewards[sl])
            with ctx.phase("value_backward"):
                vloss.backward()
            with ctx.phase("value_optimizer"):
                vopt.step()
                vopt.zero_grad(set_to_none=True)


RL_FIELDS = ("prompt_len", "new_tokens", "optimizer", "grad_ckpt", "reward_model", "kl_coef", "frozen_placement")
GRPO = Technique(name="grpo", kind="alignment",
                 description="group relative policy optimization: G completions per prompt, no value model",
                 workload=grpo_workload, step=grpo_step, plan_fields=RL_FIELDS + ("group_size",))
PPO = Technique(name="ppo", kind="alignment",
                description="PPO with policy, value, reference and reward models; rollout then clipped updates",
                workload=ppo_workload, step=ppo_step,
                plan_fields=RL_FIELDS + ("value_model", "ppo_epochs", "mini_batch"))


@hookimpl
def register_techniques(register) -> None:
    register(GRPO)
    register(PPO)
