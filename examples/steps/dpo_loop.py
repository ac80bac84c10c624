"""A hand-written DPO loop (task dpo, full fine-tune: a policy and a frozen reference), in two orders.

    planner dryrun examples/steps/dpo_loop.py:trl_order --task dpo --model llama-3.2-1b --batch 2 --seq 1024
    planner dryrun examples/steps/dpo_loop.py:both_forwards_first --task dpo --model llama-3.2-1b --batch 2 --seq 1024

Both compute the same loss. `trl_order` turns each model's logits into per-sequence log-probabilities
right after its forward (TRL's order: the policy, then the reference); `both_forwards_first` runs both
forwards before either log-softmax, so the reference's logits are alive beside the policy's while the
fp32 log-softmax runs: one more logits tensor at the peak.
"""

import torch
import torch.nn.functional as F

BETA = 0.1


def logprobs(logits, ids):
    """Per-sequence sum of the log-probabilities of the next tokens."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)


def dpo_loss(pol, ref, batch):
    margin = (pol[:batch] - pol[batch:]) - (ref[:batch] - ref[batch:])
    return -F.logsigmoid(BETA * margin).mean()


def backward_and_step(ctx, loss, opt):
    with ctx.phase("backward"):
        loss.backward()
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def trl_order(ctx):
    policy, reference, opt = ctx.model("policy"), ctx.model("reference"), ctx.optimizer("policy")
    b = ctx.plan.batch
    ids = ctx.token_ids(2 * b, ctx.plan.seq)  # chosen and rejected, concatenated
    with ctx.phase("forward"):
        pol = logprobs(policy(input_ids=ids).logits, ids)
        with torch.no_grad():
            ref = logprobs(reference(input_ids=ids).logits, ids)
        loss = dpo_loss(pol, ref, b)
    backward_and_step(ctx, loss, opt)


def both_forwards_first(ctx):
    policy, reference, opt = ctx.model("policy"), ctx.model("reference"), ctx.optimizer("policy")
    b = ctx.plan.batch
    ids = ctx.token_ids(2 * b, ctx.plan.seq)
    with ctx.phase("forward"):
        pol_logits = policy(input_ids=ids).logits
        with torch.no_grad():
            ref_logits = reference(input_ids=ids).logits
        pol = logprobs(pol_logits, ids)
        ref = logprobs(ref_logits, ids)
        loss = dpo_loss(pol, ref, b)
    backward_and_step(ctx, loss, opt)
