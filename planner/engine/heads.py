"""What follows the decoder layers in a training step: the final norm, a head, and the loss program.

Each head replays its program on a tape starting from the final hidden states and says what the
step keeps around it:
- `forward`: moments after the last layer (phase, what, live bytes over the layers' saved tensors);
- `saved`: what autograd keeps for backward once the loss is computed;
- `held`: what the program keeps referenced through backward and the optimizer step (a loop variable);
- `prev_held`: what the previous step still holds while the next forward runs;
- `backward`: moments at the start of backward (extra temporaries), before the decoder layers.

Programs (shared/notes/heldout-protocol.md; the techniques' `step` functions run exactly these):
- causal_lm: `out = model(input_ids=ids, labels=ids)`: transformers' ForCausalLMLoss (logits.float(),
  cross_entropy = log_softmax + nll); `out` holds the logits until the next forward returns.
- logprobs (DPO's policy): `log_softmax(model(ids).logits.float(), -1).gather(-1, ids)` summed per
  sequence; nothing of batch x seq x vocab size is held after the loss but log_softmax's output.
- pairwise (reward model): sequence-classification head `score` (hidden -> 1) on every position,
  the last token's score pooled; loss `-logsigmoid(r_chosen - r_rejected).mean()`.
- kl (distillation): `kl_div(log_softmax(s.float()), log_softmax(t.float()), log_target=True,
  reduction="batchmean")` with the student's logits `s` bound through the step; the teacher's
  logits are carried from the teacher's phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.architecture import ModelSpec
from planner.engine.layers import LayerCfg, gemma_rms_norm, layer_norm, rms_norm
from planner.engine.ops import Weight, binary, cast, linear, unary
from planner.engine.resident import Resident
from planner.engine.tape import DTYPE_BYTES, Sym, Tape, ZERO, tok


@dataclass
class HeadRun:
    # (phase, what, live bytes, details, whether the previous step's held tensors are still bound)
    forward: list[tuple[str, str, Sym, dict[str, Sym], bool]] = field(default_factory=list)
    saved: Sym = ZERO
    held: Sym = ZERO
    prev_held: Sym = ZERO
    backward: list[tuple[str, Sym, dict[str, Sym]]] = field(default_factory=list)


def _norm_and_logits(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool):
    tp = Tape()
    x = tp.new(tok(spec.hidden_size), res_dtype, True, "final_hidden")
    norm = {"gemma2": gemma_rms_norm, "gpt2": layer_norm, "opt": layer_norm}.get(cfg.family, rms_norm)
    hn = norm(tp, x, cfg, "norm")
    tp.drop(x)
    logits = linear(tp, hn, Weight(spec.hidden_size, spec.vocab_size, res.non_linear_dtype, full), cfg.autocast, "lm_head")
    tp.drop(hn)
    if spec.final_logit_softcapping:
        a = unary(tp, logits, "softcap_div")
        tp.drop(logits)
        b = unary(tp, a, "softcap_tanh", saves_output=True)
        tp.drop(a)
        logits = unary(tp, b, "softcap_mul")
        tp.drop(b)
    return tp, logits


def _logit_details(v: int, held: Sym, held_dtype: str, fp32_count: int) -> dict[str, Sym]:
    """batch x seq x vocab tensors live at a moment: `held` plus `fp32_count` fp32 ones."""
    fp32 = Sym(t=v * 4)
    if held == ZERO:
        return {"logits_fp32": fp32 * fp32_count}
    if held_dtype == "fp32":
        return {"logits_fp32": held + fp32 * fp32_count}
    return {"logits": held, "logits_fp32": fp32 * fp32_count}


def causal_lm(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    V = spec.vocab_size
    tp, logits = _norm_and_logits(spec, cfg, res, res_dtype, full)
    after_logits = tp.live
    lf = cast(tp, logits, "fp32", "logits.float")
    unary(tp, lf, "log_softmax", saves_output=True)
    loss_peak = tp.live
    tp.drop(lf)
    held = logits.size
    fp32 = 1 if logits.dtype == "fp32" else 2
    return HeadRun(
        # the loss runs inside model(...): `out` is rebound only after it
        forward=[("forward", "lm_head", after_logits, {}, True),
                 ("loss", "log_softmax over fp32 logits", loss_peak, _logit_details(V, held, logits.dtype, fp32), True)],
        saved=tp.saved_total, held=held, prev_held=held,
        # nll backward's gradient and log_softmax backward's output, both fp32, with the saved output
        backward=[("log_softmax backward", Sym(t=2 * V * 4), _logit_details(V, held, logits.dtype, 3))],
    )


def logprobs(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    V = spec.vocab_size
    tp, logits = _norm_and_logits(spec, cfg, res, res_dtype, full)
    after_logits = tp.live
    lf = cast(tp, logits, "fp32", "logits.float")
    lsm = unary(tp, lf, "log_softmax", saves_output=True)
    loss_peak = tp.live
    tp.drop(lf, logits)
    gathered = unary(tp, lsm, "gather", elems=tok(1))  # saves the index (the input ids) only
    tp.drop(lsm, gathered)
    fp32 = 1 if logits.dtype == "fp32" else 2
    return HeadRun(
        forward=[("forward", "lm_head", after_logits, {}, True),
                 ("loss", "log_softmax over fp32 logits", loss_peak, _logit_details(V, logits.size, logits.dtype, fp32),
                  True)],
        saved=tp.saved_total,
        # gather backward's zero-filled gradient and log_softmax backward's output, with the saved output
        backward=[("log_softmax backward", Sym(t=2 * V * 4), _logit_details(V, ZERO, "fp32", 3))],
    )


def pairwise(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    tp = Tape()
    x = tp.new(tok(spec.hidden_size), res_dtype, True, "final_hidden")
    norm = {"gemma2": gemma_rms_norm, "gpt2": layer_norm, "opt": layer_norm}.get(cfg.family, rms_norm)
    hn = norm(tp, x, cfg, "norm")
    tp.drop(x)
    # the score head is trained in every method (peft's SEQ_CLS task keeps it in modules_to_save)
    scores = linear(tp, hn, Weight(spec.hidden_size, 1, res.non_linear_dtype, True), cfg.autocast, "score")
    tp.drop(hn, scores)
    grad_hidden = Sym(t=spec.hidden_size * DTYPE_BYTES[cfg.autocast or res_dtype])
    return HeadRun(
        forward=[("forward", "score head", tp.live, {}, True)],
        saved=tp.saved_total,
        backward=[("score head backward", grad_hidden, {})],
    )


def kl(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool,
       hard_labels: bool = False) -> HeadRun:
    V = spec.vocab_size
    tp, s_logits = _norm_and_logits(spec, cfg, res, res_dtype, full)
    after_logits = tp.live
    moments: list[tuple[str, str, Sym, dict[str, Sym], bool]] = [("forward", "lm_head", after_logits, {}, True)]
    sf = cast(tp, s_logits, "fp32", "student.float")
    s_lsm = unary(tp, sf, "student.log_softmax", saves_output=True)
    tp.drop(sf)
    # the teacher's logits (carried from its phase, bf16 or its dtype) go through the same two steps
    tf = tp.new(tok(V), "fp32", False, "teacher.float")
    t_lsm = unary(tp, tf, "teacher.log_softmax")
    tp.drop(tf)
    exp_t = unary(tp, t_lsm, "kl.exp")
    diff = binary(tp, t_lsm, s_lsm, "kl.target_minus_input", saves=False)
    prod = binary(tp, exp_t, diff, "kl.mul", saves=True)  # saves exp(target): the input's gradient needs it
    # the student's logits are bound (the loop variable rebound) before the loss is computed
    moments.append(("loss", "kl_div over fp32 log-probabilities", tp.live, {}, False))
    tp.drop(t_lsm, exp_t, diff, s_lsm, prod)
    backward = [("kl_div backward", Sym(t=V * 4), {}), ("log_softmax backward", Sym(t=V * 4), {})]
    if hard_labels:
        # + cross_entropy(student.float(), labels): another fp32 copy and a saved log_softmax; its
        # backward runs first (created last) and leaves a bf16 gradient of the logits while the KL
        # branch runs
        cf = cast(tp, s_logits, "fp32", "ce.float")
        unary(tp, cf, "ce.log_softmax", saves_output=True)
        moments.append(("loss", "cross_entropy over fp32 logits", tp.live, {}, False))
        tp.drop(cf)
        ce_grad = Sym(t=V * DTYPE_BYTES[s_logits.dtype])
        backward = [("cross_entropy backward", Sym(t=2 * V * 4), {})] + [
            (what, t + ce_grad - Sym(t=V * 4), d) for what, t, d in backward]
    held = s_logits.size
    return HeadRun(
        forward=moments,
        saved=tp.saved_total, held=held, prev_held=held,
        # mul backward's gradient (grad x exp(target)) while exp(target) is still saved; then, with
        # exp(target) released, sub backward's negation and log_softmax backward's output: at each
        # moment three batch x seq x vocab fp32 tensors beside the student's log-probabilities
        backward=backward,
    )


def kl_hard(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    """kl, mixed with the hard-label cross-entropy on the student's logits."""
    return kl(spec, cfg, res, res_dtype, full, hard_labels=True)


HEADS = {"causal_lm": causal_lm, "logprobs": logprobs, "pairwise": pairwise, "kl": kl, "kl_hard": kl_hard}
