"""A custom distillation loss (task distill: a frozen teacher and a trained student).

    planner dryrun examples/steps/distill_loss.py:step --task distill --model llama-3.2-1b --teacher llama-3.2-3b \
        --batch 2 --seq 1024

Temperature-scaled KL on the teacher's top 64 logits only (the rest of the vocabulary's mass lumped
into one bucket), mixed with the hard-label cross-entropy: a loss the catalog's distill technique
(full-vocabulary KL) does not name.
"""

import torch
import torch.nn.functional as F

T = 2.0
K = 64
ALPHA = 0.5


def step(ctx):
    teacher, student, opt = ctx.model("teacher"), ctx.model("student"), ctx.optimizer("student")
    ids = ctx.token_ids(ctx.plan.batch, ctx.plan.seq)
    with ctx.phase("teacher"), torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
        top, idx = t_logits.float().topk(K, dim=-1)
        del t_logits
        t_lp = F.log_softmax(top / T, dim=-1)
    with ctx.phase("forward"):
        s_logits = student(input_ids=ids).logits
        s_lp = F.log_softmax(s_logits.float().gather(-1, idx) / T, dim=-1)
        kl = F.kl_div(s_lp, t_lp, log_target=True, reduction="batchmean") * T * T
        ce = F.cross_entropy(s_logits[:, :-1].float().reshape(-1, s_logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss = ALPHA * kl + (1 - ALPHA) * ce
    with ctx.phase("backward"):
        loss.backward()
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
