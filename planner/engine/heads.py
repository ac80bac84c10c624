"""What follows the decoder layers in a training step: the final norm, a head, and the loss program.

Each head replays its program on a tape starting from the final hidden states and says what the
step keeps around it:
- `forward`: moments after the last layer (phase, what, live bytes over the layers' saved tensors);
- `saved`: what autograd keeps for backward once the loss is computed;
- `held`: what the program keeps referenced through backward and the optimizer step (a loop variable);
- `prev_held`: what the previous step would still hold while the next forward runs: nothing, since the
  measured programs release a step's outputs when the step ends (docs/allocator.md: the H200 steps'
  reserved memory shows it);
- `backward`: moments at the start of backward (extra temporaries), before the decoder layers.

Programs (shared/notes/heldout-protocol.md; the techniques' `step` functions run exactly these):
- causal_lm: `out = model(input_ids=ids, labels=ids)`: transformers' ForCausalLMLoss (logits.float(),
  cross_entropy = log_softmax + nll); `out` holds the logits until the step ends.
- logprobs (DPO's policy): `log_softmax(model(ids).logits.float(), -1).gather(-1, ids)` summed per
  sequence; nothing of batch x seq x vocab size is held after the loss but log_softmax's output.
- pairwise (reward model): sequence-classification head `score` (hidden -> 1) on every position,
  the last token's score pooled; loss `-logsigmoid(r_chosen - r_rejected).mean()`.
- selective (DPO's policy with `logprobs: selective`): TRL 1.16.0's selective_log_softmax over the
  logits, its CUDA path (a Triton kernel: the logits saved in their dtype, per-token vectors only).
- fused (DPO's policy with `logprobs: fused`): TRL 1.16.0's fused LM head (add_fused_lm_head):
  `model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs` summed per sequence; the hidden
  states of the scored positions are gathered (`hidden[mask]`), projected in tiles of
  4096 tokens x 32768 vocabulary entries into one reused buffer and folded into per-token statistics;
  its backward recomputes every tile and accumulates the hidden states' (and the head weight's)
  gradients in fp32. The scored positions are counted as batch x seq (TRL scores seq - 1 per
  sequence: the estimate is high by one position per sequence).
- kl (distillation): `kl_div(log_softmax(s.float()), log_softmax(t.float()), log_target=True,
  reduction="batchmean")` with the student's logits `s` bound through the step; the teacher's
  logits are carried from the teacher's phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRL_TOKEN_TILE = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE (TRL 1.16.0)
TRL_VOCAB_TILE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE (TRL 1.16.0)
# per-token outputs of the fused head and their dtypes (FusedCausalLMOutput's fields)
FUSED_OUTPUT_DTYPES = {"log_probs": "fp32", "entropy": "fp32", "log_sum_sq_probs": "fp32", "mean_logits": "fp32",
                       "is_top1": "bool"}
# TRL 1.16.0's DPOTrainer patches the policy with these (entropy, mean logits and top-1 feed its metrics)
FUSED_POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


@dataclass(frozen=True)
class FusedTiles:
    """What of the fused head's buffers depends on the number N of scored positions: the tile buffer
    has min(N, 4096) rows; with more than one token tile the chunk casts are re-made per tile."""

    rows: int
    several: bool

    @classmethod
    def for_positions(cls, n: int) -> "FusedTiles":
        return cls(min(n, TRL_TOKEN_TILE), n > TRL_TOKEN_TILE)

from planner.architecture import ModelSpec
from planner.engine.layers import LayerCfg, gemma_rms_norm, layer_norm, rms_norm
from planner.engine.ops import Weight, binary, cast, linear, unary
from planner.engine.resident import Resident
from planner.engine.tape import DTYPE_BYTES, OpList, Sym, Tape, Tensor, ZERO, fixed, tok


@dataclass
class HeadRun:
    # (phase, what, live bytes, details, whether the previous step's held tensors are still bound)
    forward: list[tuple[str, str, Sym, dict[str, Sym], bool]] = field(default_factory=list)
    saved: Sym = ZERO
    held: Sym = ZERO
    prev_held: Sym = ZERO
    backward: list[tuple[str, Sym, dict[str, Sym]]] = field(default_factory=list)
    # whether the head runs inside the backbone's forward (which holds `inputs_embeds` until it returns)
    inside_backbone: bool = True
    # the aten ops: of the forward up to the logits (final norm, head), of the loss program after
    # them, and of their backward
    fwd_ops: OpList = field(default_factory=OpList)
    loss_ops: OpList = field(default_factory=OpList)
    bwd_ops: OpList = field(default_factory=OpList)
    # trainable tensors of the head beside the resident model's, as (dtype, elements, tensors): what the
    # optimizer steps over too (planner.engine.program.optimizer_ops)
    trainable: tuple[tuple[str, int, int], ...] = ()


def split_ops(tp: Tape, head_end: int) -> dict[str, OpList]:
    """The tape's forward ops split at `head_end` (ops before it: the forward phase, after: the loss),
    and its backward ops, for a HeadRun."""
    ops = tp.fwd.ops
    return {"fwd_ops": OpList(ops[:head_end], tp.fwd.modules), "loss_ops": OpList(ops[head_end:]),
            "bwd_ops": tp.backward_ops()}


def final_norm(tp: Tape, x: Tensor, cfg: LayerCfg) -> Tensor:
    """The backbone's final norm (the family's norm module)."""
    norm = {"gemma2": gemma_rms_norm, "gpt2": layer_norm, "opt": layer_norm}.get(cfg.family, rms_norm)
    return norm(tp, x, cfg, "norm")


def _norm_and_logits(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool):
    tp = Tape()
    x = tp.new(tok(spec.hidden_size), res_dtype, True, "final_hidden")
    hn = final_norm(tp, x, cfg)
    tp.drop(x)
    tp.op("view", "alias")  # hidden_states[:, slice(-logits_to_keep, None), :] with logits_to_keep = 0
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
    head_end = len(tp.fwd.ops)
    lf = cast(tp, logits, "fp32", "logits.float")
    # ForCausalLMLoss: labels padded and shifted (constant_pad_nd, slice, clone), both flattened
    # (views), cross_entropy = _log_softmax + nll_loss_forward; backward: ones_like (the loss's
    # gradient), nll_loss_backward, _log_softmax_backward_data, the logits view's backward
    tp.op("elementwise", "constant_pad_nd", bytes=Sym(t=16), dtype="int64")
    tp.op("view", "slice")
    tp.op("elementwise", "clone", bytes=Sym(t=16), dtype="int64")
    tp.op("view", "view", count=2)
    unary(tp, lf, "log_softmax", saves_output=True, aten="_log_softmax", bwd=("_log_softmax_backward_data",))
    tp.op("elementwise", "nll_loss_forward", bytes=Sym(t=4 + 8), dtype="fp32")
    tp.bop("elementwise", "ones_like", dtype="fp32")
    tp.bop("elementwise", "nll_loss_backward", bytes=Sym(t=V * 4), dtype="fp32")
    tp.bop("view", "view")
    loss_peak = tp.live
    tp.drop(lf)
    held = logits.size
    fp32 = 1 if logits.dtype == "fp32" else 2
    return HeadRun(
        # the loss runs inside model(...), under its autocast region
        forward=[("forward", "lm_head", after_logits, {}, True),
                 ("loss", "log_softmax over fp32 logits", loss_peak, _logit_details(V, held, logits.dtype, fp32), True)],
        saved=tp.saved_total, held=held,
        # nll backward's gradient and log_softmax backward's output, both fp32, with the saved output
        backward=[("log_softmax backward", Sym(t=2 * V * 4), _logit_details(V, held, logits.dtype, 3))],
        **split_ops(tp, head_end),
    )


def logprobs(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    V = spec.vocab_size
    tp, logits = _norm_and_logits(spec, cfg, res, res_dtype, full)
    after_logits = tp.live
    head_end = len(tp.fwd.ops)
    lf = cast(tp, logits, "fp32", "logits.float")
    lsm = unary(tp, lf, "log_softmax", saves_output=True, aten="_log_softmax", bwd=("_log_softmax_backward_data",))
    loss_peak = tp.live
    tp.drop(lf, logits)
    # .gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1): the gather's backward scatters into zeros
    tp.op("view", "unsqueeze")
    gathered = unary(tp, lsm, "gather", elems=tok(1), aten="gather", bwd=("new_zeros", "scatter_add"))
    tp.op("view", "squeeze")
    tp.bop("view", "unsqueeze")  # squeeze's backward (the sum per sequence is the technique's: Phase.loss_ops)
    tp.drop(lsm, gathered)
    fp32 = 1 if logits.dtype == "fp32" else 2
    return HeadRun(
        forward=[("forward", "lm_head", after_logits, {}, True),
                 ("loss", "log_softmax over fp32 logits", loss_peak, _logit_details(V, logits.size, logits.dtype, fp32),
                  True)],
        saved=tp.saved_total,
        # gather backward's zero-filled gradient and log_softmax backward's output, with the saved output
        backward=[("log_softmax backward", Sym(t=2 * V * 4), _logit_details(V, ZERO, "fp32", 3))],
        **split_ops(tp, head_end),
    )


def selective(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    """`selective_log_softmax(model(ids).logits, ids)` (TRL 1.16.0) on CUDA: the Triton kernel keeps
    the logits for backward and writes four fp32 per-token vectors (log-probs, entropy, log Z,
    expected logit; log Z and the expected logit are saved); its backward allocates one gradient
    like the logits."""
    V = spec.vocab_size
    tp, logits = _norm_and_logits(spec, cfg, res, res_dtype, full)
    after_logits = tp.live
    vecs = tp.new(tok(4), "fp32", False, "logprobs, entropy, log_z, expected_logit")
    loss_peak = tp.live
    tp.save(logits)
    tp.drop(logits, vecs)
    tp.save(tp.new(tok(2), "fp32", False, "log_z, expected_logit"))
    return HeadRun(
        forward=[("forward", "lm_head", after_logits, {}, True),
                 ("loss", "selective log-softmax kernel", loss_peak, {"logits": logits.size}, True)],
        saved=tp.saved_total,
        backward=[("selective log-softmax backward", Sym(t=V * DTYPE_BYTES[logits.dtype]) + Sym(t=2 * 4),
                   {"logits": logits.size})],
    )


def pairwise(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    tp = Tape()
    x = tp.new(tok(spec.hidden_size), res_dtype, True, "final_hidden")
    hn = final_norm(tp, x, cfg)
    tp.drop(x)
    # the score head is trained in every method (peft's SEQ_CLS task keeps it in modules_to_save)
    scores = linear(tp, hn, Weight(spec.hidden_size, 1, res.non_linear_dtype, True), cfg.autocast, "score")
    head_end = len(tp.fwd.ops)
    # transformers' pooling: the last non-pad token of each sequence, (ids != pad).to(int32) *
    # arange(seq), argmax, then logits[arange(batch), last]; its backward scatters into zeros
    for name in ("ne", "_to_copy", "arange", "mul", "argmax", "arange"):
        tp.op("elementwise", name, bytes=Sym(t=8), dtype="int64")
    tp.op("elementwise", "index", bytes=Sym(t=4), dtype=scores.dtype)
    tp.bop("elementwise", "new_zeros", bytes=Sym(t=4), dtype=scores.dtype)
    tp.bop("elementwise", "index_put", bytes=Sym(t=8), dtype=scores.dtype)
    tp.drop(hn, scores)
    grad_hidden = Sym(t=spec.hidden_size * DTYPE_BYTES[cfg.autocast or res_dtype])
    return HeadRun(
        forward=[("forward", "score head", tp.live, {}, True)],
        saved=tp.saved_total,
        backward=[("score head backward", grad_hidden, {})],
        # with adapters, peft's trained copy of `score` (modules_to_save) is not among the resident's
        # trainable tensors (the adapters'); a full fine-tune's score is
        trainable=() if full else ((res.non_linear_dtype, spec.hidden_size, 1),),
        **split_ops(tp, head_end),
    )


@dataclass(frozen=True)
class FusedForward:
    """What TRL's fused head leaves on the tape after its forward, and the sizes its backward reuses."""

    tile: Sym  # live bytes while a projection tile is folded (the forward's largest moment)
    held: Sym  # the per-token outputs the program keeps bound
    hidden: Tensor  # the gathered hidden states (saved for backward)
    compute_dtype: str
    buffer: Sym  # the projection tile buffer
    hidden_cast: Sym  # a token tile of the hidden states cast to the compute dtype (or nothing)
    weight_cast: Sym  # a vocabulary chunk of the head weight cast to the compute dtype (or nothing)


def fused_head_forward(tp: Tape, hn: Tensor, spec: ModelSpec, cfg: LayerCfg, res: Resident, tiles: FusedTiles,
                       outputs: tuple[str, ...]) -> FusedForward:
    """TRL's `_fused_forward` after the backbone, on the tape."""
    V, H = spec.vocab_size, spec.hidden_size
    mask = tp.new(tok(1), "bool", False, "label_mask")
    hc = tp.new(tok(H), hn.dtype, hn.rg, "hidden[mask]")  # index's backward keeps only the mask
    tp.save(mask)
    targets = tp.new(tok(1), "int64", False, "labels[mask]")
    stats = tp.new(tok(7), "fp32", False, "online log-sum-exp statistics")
    cd = cfg.autocast or hc.dtype
    buf = tp.new(fixed(tiles.rows * TRL_VOCAB_TILE), cd, False, "projection tile")
    # hidden[tile].to(compute dtype), bound until the next token tile
    h_cast = tp.new(fixed(tiles.rows * H), cd, False, "hidden tile cast") if hc.dtype != cd else None
    # weight[chunk].to(compute dtype), an argument of torch.mm
    w_cast = (tp.new(fixed(min(V, TRL_VOCAB_TILE) * H), cd, False, "lm_head chunk cast")
              if res.non_linear_dtype != cd else None)
    casts = [t for t in (h_cast, w_cast) if t is not None]
    tile_moment = tp.live
    tp.drop(*casts, buf)
    log_z = tp.new(tok(1), "fp32", False, "log_z")
    kept = [log_z]
    outs = [tp.new(tok(1), "fp32", False, "log_probs")]
    if "entropy" in outputs:
        outs.append(tp.new(tok(1), "fp32", False, "entropy"))
        kept.append(outs[-1])
    for name in outputs:
        if name not in ("log_probs", "entropy"):
            outs.append(tp.new(tok(1), FUSED_OUTPUT_DTYPES[name], False, name))
    tp.drop(stats)
    tp.save(hc, targets, *kept)
    # each output scattered back to (batch, seq - 1): new_zeros(...).masked_scatter(mask, x)
    held = ZERO
    for o in outs:
        scattered = tp.new(tok(1), o.dtype, False, f"{o.name} scattered")
        tp.drop(o)
        held = held + scattered.size
    return FusedForward(tile=tile_moment, held=held, hidden=hc, compute_dtype=cd, buffer=buf.size,
                        hidden_cast=h_cast.size if h_cast else ZERO, weight_cast=w_cast.size if w_cast else ZERO)


def fused(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool,
          tiles: FusedTiles = FusedTiles(TRL_TOKEN_TILE, True),
          outputs: tuple[str, ...] = FUSED_POLICY_OUTPUTS) -> HeadRun:
    V, H = spec.vocab_size, spec.hidden_size
    tp = Tape()
    x = tp.new(tok(H), res_dtype, True, "final_hidden")
    norm = {"gemma2": gemma_rms_norm, "gpt2": layer_norm, "opt": layer_norm}.get(cfg.family, rms_norm)
    hn = norm(tp, x, cfg, "norm")
    tp.drop(x)
    f = fused_head_forward(tp, hn, spec, cfg, res, tiles, outputs)
    tp.drop(hn)  # `backbone_outputs` is released when the patched forward returns
    hc = f.hidden
    # ChunkedLogProbFunction.backward: fp32 accumulators, the tile buffer, the chunk casts, then
    # `grad.to(dtype)` of each accumulator while the accumulators and the buffer are still bound
    grad_in = Sym(t=2 * 4)  # the log-probs' gradient: slice backward's zeros and masked_select's output
    acc = Sym(t=H * 4) + (Sym(c=V * H * 4) if full else ZERO)
    last_chunk = V - TRL_VOCAB_TILE * ((V - 1) // TRL_VOCAB_TILE)
    w_last = Sym(c=last_chunk * H * DTYPE_BYTES[f.compute_dtype]) if f.weight_cast != ZERO else ZERO
    # `w_chunk = weight[...].to(...)` is rebound: the new cast exists before the old one is freed
    rebinds = 2 if (V > TRL_VOCAB_TILE or tiles.several) else 1
    out_casts = (Sym(t=H * DTYPE_BYTES[hc.dtype]) if hc.dtype != "fp32" else ZERO) + (
        Sym(c=V * H * DTYPE_BYTES[res.non_linear_dtype]) if full and res.non_linear_dtype != "fp32" else ZERO)
    common = grad_in + acc + f.buffer + f.hidden_cast
    return HeadRun(
        forward=[("forward", "fused lm_head tile", f.tile, {}, True),
                 ("forward", "fused lm_head outputs", tp.live, {}, True)],
        saved=tp.saved_total, held=f.held,
        backward=[("fused lm_head backward tile", common + f.weight_cast * rebinds, {}),
                  ("fused lm_head backward return", common + w_last + out_casts, {})],
        inside_backbone=False,
    )


def kl(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool,
       hard_labels: bool = False) -> HeadRun:
    V = spec.vocab_size
    tp, s_logits = _norm_and_logits(spec, cfg, res, res_dtype, full)
    after_logits = tp.live
    head_end = len(tp.fwd.ops)
    moments: list[tuple[str, str, Sym, dict[str, Sym], bool]] = [("forward", "lm_head", after_logits, {}, True)]
    sf = cast(tp, s_logits, "fp32", "student.float")
    s_lsm = unary(tp, sf, "student.log_softmax", saves_output=True, aten="_log_softmax",
                  bwd=("_log_softmax_backward_data",))
    tp.drop(sf)
    # the teacher's logits (carried from its phase, bf16 or its dtype) go through the same two steps
    tf = tp.new(tok(V), "fp32", False, "teacher.float")
    tp.op("elementwise", "_to_copy", bytes=tf.size * 1.5, dtype="fp32")
    t_lsm = unary(tp, tf, "teacher.log_softmax", aten="_log_softmax")
    tp.drop(tf)
    # kl_div(input, target, log_target=True) = (exp(target) * (target - input)), summed / batch
    diff = binary(tp, t_lsm, s_lsm, "kl.target_minus_input", saves=False, aten="sub")
    exp_t = unary(tp, t_lsm, "kl.exp", aten="exp")
    prod = binary(tp, exp_t, diff, "kl.mul", saves=True)  # saves exp(target): the input's gradient needs it
    tp.op("elementwise", "sum", bytes=prod.size, dtype="fp32")
    tp.op("elementwise", "div", bytes=Sym(c=8), dtype="fp32")
    tp.bop("elementwise", "ones_like", bytes=Sym(c=8), dtype="fp32")
    tp.bop("elementwise", "div", bytes=Sym(c=8), dtype="fp32")
    tp.bop("view", "expand")
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
        **split_ops(tp, head_end),
        saved=tp.saved_total, held=held,
        # mul backward's gradient (grad x exp(target)) while exp(target) is still saved; then, with
        # exp(target) released, sub backward's negation and log_softmax backward's output: at each
        # moment three batch x seq x vocab fp32 tensors beside the student's log-probabilities
        backward=backward,
    )


def kl_hard(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool) -> HeadRun:
    """kl, mixed with the hard-label cross-entropy on the student's logits."""
    return kl(spec, cfg, res, res_dtype, full, hard_labels=True)


def fused_logprobs_only(spec: ModelSpec, cfg: LayerCfg, res: Resident, res_dtype: str, full: bool,
                        tiles: FusedTiles = FusedTiles(TRL_TOKEN_TILE, True)) -> HeadRun:
    """The fused head patched with the default outputs (log-probabilities only)."""
    return fused(spec, cfg, res, res_dtype, full, tiles, ("log_probs",))


HEADS = {"causal_lm": causal_lm, "logprobs": logprobs, "selective": selective, "pairwise": pairwise, "kl": kl,
         "kl_hard": kl_hard, "fused": fused, "fused_logprobs": fused_logprobs_only}
# heads whose buffers depend on the number of scored positions (built per FusedTiles), and the
# per-token outputs each asks the fused head for
TILED_HEADS = {"fused": FUSED_POLICY_OUTPUTS, "fused_logprobs": ("log_probs",)}
