"""The memory timeline of a training step (transformers causal-LM loss, backward, optimizer step).

The program replayed (see ../shared/notes/heldout-protocol.md):
    out = model(input_ids=ids, labels=ids); out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
once per step, each step's references released when it ends (the measured programs run a step as a
function: see docs/allocator.md). What decides its peak:
- `out` holds the step's logits through backward and `opt.step()`; the next step starts without them;
- the loss upcasts the logits to fp32 and saves log_softmax's fp32 output; its backward holds two
  more fp32 batch x seq x vocab gradients at once;
- optimizer states exist from the first `opt.step()` on: the steady step (the second) is the one
  that peaks, and its forward and backward carry them;
- with gradient checkpointing each decoder layer keeps only its input and re-runs its forward
  (saving everything) right before its backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.architecture import ModelSpec
from planner.engine.heads import HEADS, TILED_HEADS, FusedTiles
from planner.engine.layers import LAYERS, LayerCfg
from planner.engine.ops import Lora, Weight
from planner.engine.optimizers import optimizer_memory
from planner.engine.resident import Resident, lora_targets, resident
from planner.engine.tape import DTYPE_BYTES, OpList, Sym, Tape, ZERO, tok
from planner.engine.timeline import CompiledTimeline, Timeline
from planner.specs import Plan

FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "mixtral": "llama", "phi3": "llama",
          "gemma2": "gemma2", "gpt2": "gpt2", "opt": "opt"}


def layer_cfg(spec: ModelSpec, plan: Plan, res: Resident, training: bool = True) -> LayerCfg:
    family = FAMILY.get(spec.model_type)
    if family is None:
        raise ValueError(f"model: the memory engine does not yet model '{spec.model_type}' layers")
    full = plan.method == "full" and training
    targets = lora_targets(spec, plan) if plan.method != "full" else []
    # keyed by attribute name and by path (GPT-2 has attn.c_proj and mlp.c_proj)
    weights = {}
    for lin in spec.layer_linears:
        w = Weight(lin.in_features, lin.out_features, res.linear_dtype, full, lin.bias,
                   nested=plan.method == "qlora" and plan.double_quant)
        weights[lin.path] = w
        weights.setdefault(lin.name, w)
    loras = {}
    for lin in targets:
        loras[lin.path] = Lora(plan.lora_rank)
        loras.setdefault(lin.name, Lora(plan.lora_rank))
    return LayerCfg(
        family=family,
        hidden=spec.hidden_size,
        heads=spec.num_attention_heads,
        kv_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        intermediate=spec.intermediate_size,
        gated=spec.gated_mlp,
        weights=weights,
        loras=loras,
        autocast=plan.compute_dtype if plan.autocast else None,
        attn=plan.attn,
        norm_dtype=res.non_linear_dtype,
        norm_trainable=full,
        experts=spec.num_experts,
        experts_per_token=spec.experts_per_token,
        act=spec.hidden_act,
        resid_dropout=spec.resid_dropout,
        attn_dropout=spec.attention_dropout,
        training=training,
    )


@dataclass(frozen=True)
class LayerRun:
    saved: Sym  # kept for backward after the layer's forward (its input included when saved)
    peaks: list[Sym]  # candidates for the highest live bytes during the forward, input included
    out_dtype: str
    input_saved: bool  # whether autograd keeps the layer's input itself
    autocast_cached: Sym  # weight casts autocast's cache holds until the forward's autocast region ends
    fwd: OpList = field(default_factory=OpList)  # the aten ops of the layer's forward
    bwd: OpList = field(default_factory=OpList)  # ... and of its backward
    slots: int = 0  # saved tensors that require grad
    last_saving: int = -1  # index in fwd.ops of the last op that saves one


def run_layer(cfg: LayerCfg, in_dtype: str, in_rg: bool, keep_saved: bool = True, grad: bool = True) -> LayerRun:
    tp = Tape(grad=grad, keep_saved=keep_saved)
    x = tp.new(tok(cfg.hidden), in_dtype, in_rg, "layer_input")
    # the model's loop (`hidden_states = layer(hidden_states, ...)`) holds the input until the layer returns
    x.refs += 1
    cos = tp.external(tok(cfg.head_dim), in_dtype, False, "cos")
    sin = tp.external(tok(cfg.head_dim), in_dtype, False, "sin")
    out = LAYERS[cfg.family](tp, x, cos, sin, cfg)
    return LayerRun(saved=tp.saved_total, peaks=tp.peak_candidates(), out_dtype=out.dtype, input_saved=x.saved,
                    autocast_cached=tp.autocast_cached, fwd=tp.fwd, bwd=tp.backward_ops(), slots=tp.slots,
                    last_saving=tp.last_saving)


def backward_transient(cfg: LayerCfg, act_dtype: str, res_dtype: str) -> Sym:
    """Extra live bytes while one decoder layer runs backward: gradients of its activations.

    The largest moment is the MLP's elementwise backward: the gradient w.r.t. act(gate) * up
    (intermediate-sized) is live while the gradients w.r.t. act(gate) and up are produced; the
    gradient of the residual stream is live alongside. QLoRA dequantizes the largest weight again.
    """
    b = DTYPE_BYTES[act_dtype]
    inter = 3 * cfg.intermediate * b
    attn = (2 * cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim * b
    grad_stream = 2 * cfg.hidden * DTYPE_BYTES[res_dtype]
    dequant = 0
    for w in cfg.weights.values():
        if w.quantized:
            dequant = max(dequant, w.in_features * w.out_features * 2)
    return Sym(c=dequant, t=max(inter, attn) + grad_stream)


def prologue_kept(spec: ModelSpec, cfg: LayerCfg, emb_dtype: str, input_rg: bool) -> Sym:
    """Bytes the model's prologue keeps for the whole forward and backward: the rotary cos/sin tables
    (batch x seq x head_dim each, in the hidden dtype, saved by every layer's rotary muls), or GPT-2's
    embedding-dropout mask."""
    if cfg.family in ("llama", "gemma2"):
        return Sym(t=2 * spec.head_dim * DTYPE_BYTES[emb_dtype])
    if cfg.family == "gpt2" and spec.embed_dropout > 0 and cfg.training and input_rg:
        return Sym(t=spec.hidden_size)  # bool mask
    return ZERO


def build(spec: ModelSpec, plan: Plan, loss: str = "causal_lm", tiles: FusedTiles | None = None,
          passes: int = 1, accumulating: bool = False,
          keeps_previous: bool = True) -> tuple[CompiledTimeline, Resident, dict[str, int]]:
    """The step's timeline; `accumulating`: more than one micro-batch per optimizer step (every
    micro-batch after the first runs with the gradients accumulated so far: all of them exist);
    `keeps_previous`: the previous micro-batch's outputs stay bound until its forward returns."""
    res = resident(spec, plan)
    cfg = layer_cfg(spec, plan, res)
    opt = optimizer_memory(plan.optimizer, res, spec.num_layers)
    L = spec.num_layers
    h = spec.hidden_size
    full = plan.method == "full"

    # ---- prologue: embeddings and rotary tables -----------------------------------------------
    emb_dtype = res.non_linear_dtype
    # trainable embeddings, or enable_input_require_grads (peft with checkpointing, kbit prep)
    input_rg = full or (plan.grad_ckpt and plan.method != "full")
    rope = prologue_kept(spec, cfg, emb_dtype, input_rg)

    # ---- decoder layers -----------------------------------------------------------------------
    # Layer 0 differs when its input needs no grad (frozen embeddings without checkpointing):
    # its frozen ops save nothing until the first adapter output joins the graph.
    first = run_layer(cfg, emb_dtype, input_rg)
    steady = run_layer(cfg, first.out_dtype, True)
    res_dtype = steady.out_dtype
    cached = ZERO  # autocast weight casts alive through the forward beyond what autograd saves
    if plan.grad_ckpt:
        fwd_layer = run_layer(cfg, res_dtype, True, keep_saved=False)
        layer_input = Sym(t=h * DTYPE_BYTES[res_dtype])
        # checkpointed layers save nothing, but autocast's cache keeps every trainable weight's cast
        # until the forward (and its loss) leaves the autocast region
        cached = fwd_layer.autocast_cached

        def kept(n: int) -> Sym:
            """What the first n layers keep: their inputs (the checkpoints)."""
            return layer_input * n
    else:
        fwd_layer = steady

        def kept(n: int) -> Sym:
            return first.saved + steady.saved * (n - 1) if n > 0 else ZERO

    # ---- head: final norm and the loss program ---------------------------------------------------
    if loss in TILED_HEADS:
        head = HEADS[loss](spec, cfg, res, res_dtype, full, tiles=tiles or FusedTiles.for_positions(1 << 30))
    else:
        head = HEADS[loss](spec, cfg, res, res_dtype, full)
    logits_held = head.held  # e.g. `out.logits`, referenced until the step ends
    prev_held = head.prev_held

    # ---- persistent ---------------------------------------------------------------------------
    params = Sym(c=res.param_bytes)
    buffers = Sym(c=res.buffer_bytes)
    qstate = Sym(c=res.quant_state_bytes)
    states = Sym(c=opt.state_bytes)
    base = dict(parameters=params, buffers=buffers, other=qstate, optimizer_states=states)

    tl = Timeline()
    # `passes` forwards of the same shape before one backward (a pair's chosen and rejected
    # sequences in two forwards): every earlier forward's graph (what its layers and head keep) and
    # the outputs the program binds stay live through the later ones; autograd then runs the graphs
    # backward latest first (higher sequence numbers first)
    graph = kept(L) + rope + head.saved + logits_held
    # the model's forward keeps `inputs_embeds` referenced until it returns
    embeds = ZERO if first.input_saved else Sym(t=h * DTYPE_BYTES[emb_dtype])
    layers_kept = kept(L) + rope
    head_grads = Sym(c=res.head_grad_bytes)
    grad_l = Sym(c=res.layer_grad_bytes)
    grads_all = Sym(c=res.grad_bytes)
    embed_grad = Sym(c=res.embed_grad_bytes)
    bwd_t = backward_transient(cfg, plan.compute_dtype, res_dtype)
    # a later graph's gradients are computed into new tensors and added to the existing .grad
    accumulate = Sym(c=max((w.in_features * w.out_features * DTYPE_BYTES[res.trainable_dtype]
                            for w in cfg.weights.values() if w.trainable), default=0))
    # gradient accumulation: a later micro-batch runs with every .grad held (`held`), and while its
    # forward runs (the loss inside model(...) included) the previous micro-batch's outputs are still
    # bound where the program rebinds them once it returns (`out = model(...)`): `prev`
    for later in (False, True) if accumulating else (False,):
        held = grads_all if later else ZERO
        prev = (logits_held * passes if keeps_previous else ZERO) if later else prev_held
        for p in range(passes):
            before = graph * p
            # forward: the last layer is the largest moment (all earlier layers' saved tensors are live)
            for peak in fwd_layer.peaks:
                tl.add("forward", "last decoder layer", **base, gradients=held,
                       activations=before + kept(L - 1) + cached * L + rope + embeds + peak + prev)
            for phase, what, live, details, with_prev in head.forward:
                # the loss runs inside the autocast region only when it is computed inside model(...)
                in_autocast = cached * L if with_prev else ZERO
                in_backbone = phase == "forward" and head.inside_backbone
                tl.add(phase, what, **base, gradients=held, activations=before + layers_kept + in_autocast
                       + (embeds if in_backbone else ZERO) + live + (prev if with_prev else ZERO), details=details)

        for p in reversed(range(passes)):
            waiting = graph * p + logits_held * (passes - 1 - p)  # earlier graphs; later passes' outputs
            first_bwd = p == passes - 1 and not later  # the step's first backward: no .grad exists yet
            # backward: the loss and head first, then the layers
            for what, temps, details in head.backward:
                tl.add("backward", what, **base, activations=waiting + layers_kept + head.saved + logits_held,
                       temporaries=temps, gradients=ZERO if first_bwd else grads_all, details=details)
            # layer L-1 (first in backward) and layer 0 (last): the ends of a linear walk
            for idx in (L - 1, 0):
                done = head_grads + grad_l * (L - 1 - idx) if first_bwd else grads_all
                new_grads = ZERO if first_bwd else accumulate
                if plan.grad_ckpt:
                    # the layer's forward is re-run (saving everything) right before its backward
                    for peak in steady.peaks:
                        tl.add("backward", f"decoder layer {idx} recompute", **base,
                               activations=waiting + kept(idx) + rope + peak + logits_held, gradients=done)
                    acts = kept(idx + 1) + rope + steady.saved + logits_held
                else:
                    acts = kept(idx + 1) + rope + logits_held
                tl.add("backward", f"decoder layer {idx} backward", **base,
                       activations=waiting + acts, gradients=done, temporaries=bwd_t + new_grads)
            # the embedding's gradient is a temporary of embedding_dense_backward until AccumulateGrad
            # stores it as .grad; the gradient of the embedding output is still live
            tl.add("backward", "embedding backward", **base, activations=waiting + logits_held,
                   gradients=grads_all - (embed_grad if first_bwd else ZERO),
                   temporaries=embed_grad + Sym(t=h * DTYPE_BYTES[res_dtype]))
    tl.add("optimizer", f"{plan.optimizer} step", **base, activations=logits_held * passes, gradients=grads_all,
           temporaries=Sym(c=opt.step_temp_bytes))
    extra = resident_details(res)
    if opt.paged_bytes:
        extra["paged_optimizer_states"] = opt.paged_bytes
    # between the forward and the backward: every pass's graph, and autocast's cache while the
    # program stays in the autocast region
    return tl.compiled(after_forward=graph * passes + cached * L, held=logits_held * passes), res, extra


def resident_details(res: Resident) -> dict[str, int]:
    d: dict[str, int] = {}
    if res.adapter_bytes:
        d["lora_adapters"] = res.adapter_bytes
    if res.quant_state_bytes:
        d["quant_state"] = res.quant_state_bytes
    return d
