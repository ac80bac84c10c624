"""Built-in technique `distill`: knowledge distillation from a frozen teacher to a trained student.

Program (shared/notes/heldout-protocol.md): the teacher (eval, under no_grad) and the student see
the same ids; loss = kl_div(log_softmax(student.float()), log_softmax(teacher.float()),
log_target=True, reduction="batchmean"), temperature 1, optionally mixed with the hard-label
cross-entropy (`--hard-label-weight`). The loop keeps both logits bound until the
next step rebinds them. Teacher and student must share the vocabulary.
"""

from __future__ import annotations

from planner.hookspecs import hookimpl
from planner.technique import Technique
from planner.workload import ModelUse, Phase, Workload

__version__ = "0.1.0"


class DistillError(ValueError):
    pass


def distill_workload(plan, model) -> Workload:
    from planner.engine.tape import DTYPE_BYTES
    from planner.models import load_model

    if plan.teacher is None:
        raise DistillError("teacher: distill needs --teacher MODEL (a catalog id or config path)")
    teacher = load_model(plan.teacher)
    if teacher.vocab_size != model.vocab_size:
        raise DistillError(f"teacher: {teacher.id} has a vocabulary of {teacher.vocab_size} tokens and "
                           f"{model.id} one of {model.vocab_size}: distillation over logits needs the same vocabulary")
    t_setup = plan.model_copy(update={"method": plan.teacher_method, "precision": "bf16", "grad_ckpt": False})
    # the teacher's head stays in its load dtype (bf16; a frozen 4-bit teacher gets no kbit preparation)
    teacher_logits = DTYPE_BYTES[t_setup.weight_dtype] * teacher.vocab_size
    return Workload(
        technique="distill",
        models=(ModelUse("student", model, plan, trainable=True, ref=plan.model),
                ModelUse("teacher", teacher, t_setup, trainable=False, ref=plan.teacher)),
        phases=(
            # the step starts with nothing of the previous one (its logits went when it ended); a later
            # micro-batch's teacher runs while the previous one's logits are still bound
            Phase("teacher", "forward", "teacher", plan.batch, plan.seq, micro_batches=plan.grad_accum,
                  previous="student"),
            Phase("student", "train_step", "student", plan.batch, plan.seq,
                  loss="kl_hard" if plan.hard_label_weight > 0 else "kl", carried=teacher_logits,
                  micro_batches=plan.grad_accum),
        ),
    )


def distill_step(ctx) -> None:
    import torch
    import torch.nn.functional as F

    p = ctx.plan
    teacher, student, opt = ctx.model("teacher"), ctx.model("student"), ctx.optimizer("student")
    for _ in range(p.grad_accum):  # micro-batches, as sft's step runs them (the step's locals rebound)
        ids = ctx.token_ids(p.batch, p.seq)
        ctx.keep(ids, "ids")
        with ctx.phase("teacher"), torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        ctx.keep(t_logits, "t_logits")  # held until the step ends (or the next micro-batch rebinds it)
        with ctx.phase("forward"):
            s_logits = student(input_ids=ids).logits
            ctx.keep(s_logits, "s_logits")
            loss = F.kl_div(F.log_softmax(s_logits.float(), dim=-1), F.log_softmax(t_logits.float(), dim=-1),
                            log_target=True, reduction="batchmean")
            if p.hard_label_weight > 0:  # mixed with the hard-label loss on the same ids
                w = p.hard_label_weight
                ce = F.cross_entropy(s_logits.float().view(-1, s_logits.shape[-1]), ids.view(-1))
                loss = (1 - w) * loss + w * ce
            ctx.keep(loss, "loss")
        with ctx.phase("backward"):
            ctx.backward(loss)
        del ids, t_logits, s_logits, loss  # held by ctx.keep
    with ctx.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


DISTILL = Technique(
    name="distill", kind="compression",
    description="knowledge distillation: frozen teacher, trained student, KL over the full vocabulary",
    workload=distill_workload, step=distill_step,
    plan_fields=("seq", "grad_accum", "grad_ckpt", "optimizer", "teacher", "teacher_method", "frozen_placement",
                 "hard_label_weight"),
)


@hookimpl
def register_techniques(register) -> None:
    register(DISTILL)
