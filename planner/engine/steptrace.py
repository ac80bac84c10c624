"""The engine's allocation trace of a workload: the events the caching allocator sees (allocate and
free, with sizes symbolic in batch B and sequence S), in program order, for the set-up, the reset
and `steps` steps; what the dry run's tracker records for the same program
(planner/backends/dryrun/_tracker.py, docs/allocator.md "The trace"), from the engine's own replay.

The programs are the ones the backends run (shared/notes/heldout-protocol.md, the techniques'
`step` functions): the models are built (parameters in registration order, buffers, an untied
`lm_head` allocated then freed at the tie, quantization states, adapters), the optimizer made,
`reset_peak_memory_stats()`, then per step `out = model(input_ids=ids, labels=ids)`,
`out.loss.backward()`, `opt.step()`, `opt.zero_grad(set_to_none=True)`, the step's references
released when it ends. Each module's forward is its recipe (layers.py, ops.py, heads.py) on a tape
with a recorder (planner.engine.autograd), which also runs the backward as torch's engine does.

A trace is built once per plan shape (the plan without its batch and lengths) and cached; `at(B, S)`
evaluates its sizes (each distinct size once). Model families other than Llama's (llama, mistral,
qwen2) are not traced yet: `TraceUnsupported` says which.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from planner.architecture import ModelSpec
from planner.engine.autograd import DTYPE_BYTES, Backward, Node, Recorder, Size, Sz, SizeFn, formula, sz_of
from planner.engine.layers import LAYERS, LayerCfg, rms_norm
from planner.engine.ops import Weight, binary, cast, linear, unary
from planner.engine.resident import NESTED_BLOCK, QUANT_BLOCK, lora_targets, resident
from planner.engine.runtime import cublas_workspace_bytes, embedding_backward_workspace, sdpa_backend_for
from planner.engine.tape import Sym, Tape, Tensor, fixed, tok
from planner.engine.training import layer_cfg

TRACED_FAMILIES = ("llama", "mistral", "qwen2")
STEPS = 2  # the set-up, then two steps: the second runs with the optimizer states the first made


class TraceUnsupported(ValueError):
    """The engine cannot trace this plan yet (the reason names what)."""


@dataclass(frozen=True)
class TraceOptions:
    """What the trace adds that no tensor of the program holds: the cuBLAS workspace of the forward
    thread (planner.engine.runtime: 32 MiB on sm90, 8.125 MiB elsewhere), allocated after the first
    matmul, or before the set-up when the process ran matmuls earlier (`warm`), and which SDPA backward
    kernel runs (its workspace: cuDNN on sm90/sm100, flash elsewhere)."""

    workspace_bytes: int = cublas_workspace_bytes("9.0", 1)
    sdpa_backend: str = "cudnn"
    warm: bool = False

    @classmethod
    def for_card(cls, compute_capability: str | None = "9.0", warm: bool = False) -> "TraceOptions":
        return cls(cublas_workspace_bytes(compute_capability, 1), sdpa_backend_for(compute_capability), warm)


@dataclass
class SymbolicTrace:
    """Events with symbolic sizes: ("a", id, size, stream), ("f", id), ("phase", name), ("reset",),
    ("empty_cache",). `limits`: fn(B, S) -> the reason the trace does not hold at those numbers, or None."""

    events: list[tuple]
    limits: list[Any] = field(default_factory=list)
    _sizes: list[Size] = field(default_factory=list)
    _coded: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        from planner.engine.allocator import CodedTrace

        index: dict[Size, int] = {}
        coded = []
        for e in self.events:
            if e[0] == "a":
                i = index.get(e[2])
                if i is None:
                    i = index[e[2]] = len(self._sizes)
                    self._sizes.append(e[2])
                coded.append(("a", e[1], i, e[3]))
            else:
                coded.append(e)
        self._coded = coded
        # the same events as parallel lists with size indices: evaluating them fills only the sizes
        self._template = CodedTrace.from_events([("a", e[1], e[2], 0) if e[0] == "a" else e for e in coded])

    def _sizes_at(self, batch: int, seq: int) -> list[int]:
        for limit in self.limits:
            reason = limit(batch, seq)
            if reason:
                raise TraceUnsupported(reason)
        return [s.at(batch, seq) for s in self._sizes]

    def at(self, batch: int, seq: int) -> list[tuple]:
        """The trace at B = batch, S = seq (planner.engine.allocator's event format)."""
        sizes = self._sizes_at(batch, seq)
        return [("a", e[1], sizes[e[2]], e[3]) if e[0] == "a" else e for e in self._coded]

    def coded(self, batch: int, seq: int) -> Any:
        """The trace at B = batch, S = seq as planner.engine.allocator.CodedTrace (the fast replay's
        input): the events' lists are shared, only the sizes are computed."""
        sizes = self._sizes_at(batch, seq)
        t = self._template
        # the template coded each distinct size index as a "size": map index -> bytes
        return t.with_sizes([sizes[i] for i in t.sizes])


# ---- the set-up ------------------------------------------------------------------------------
@dataclass
class ModelTrace:
    """One model of the workload as the trace knows it: its layer recipe's configuration, its
    trainable parameters in registration order (key, size, dtype) and the checkpointing it runs."""

    spec: ModelSpec
    setup: Any
    cfg: LayerCfg
    trainable: list[tuple[str, Sz, str]]
    emb_dtype: str
    full: bool
    input_rg: bool
    ckpt: bool
    tied: bool
    # QLoRA's kbit preparation enables checkpointing with empty kwargs: torch's default, reentrant
    reentrant: bool = False


def _check(spec: ModelSpec, setup: Any) -> None:
    if spec.model_type not in TRACED_FAMILIES:
        raise TraceUnsupported(f"the engine's allocation trace covers {', '.join(TRACED_FAMILIES)} models, "
                               f"not {spec.model_type} yet")
    if spec.head not in ("causal_lm", "seq_cls"):
        raise TraceUnsupported(f"the engine's allocation trace covers causal-LM and sequence-classification heads, "
                               f"not {spec.head}")
    if setup.optimizer not in ("adamw", "adamw-fused", "sgd", "adamw-8bit", "paged-adamw-8bit"):
        raise TraceUnsupported(f"the engine's allocation trace does not cover the {setup.optimizer} optimizer yet")


def model_trace(spec: ModelSpec, setup: Any, trainable: bool) -> ModelTrace:
    _check(spec, setup)
    res = resident(spec, setup)
    full = setup.method == "full" and trainable
    cfg = layer_cfg(spec, setup, res, training=trainable)
    emb_dtype = res.non_linear_dtype
    params: list[tuple[str, Sz, str]] = []
    if trainable:
        params = _trainable_params(spec, setup, res)
    ckpt = bool(setup.grad_ckpt) and trainable
    input_rg = full or (ckpt and setup.method != "full")
    # peft's prepare_model_for_kbit_training calls gradient_checkpointing_enable with {} (not None), so
    # transformers passes no use_reentrant and torch.utils.checkpoint takes its default: reentrant
    # (peft <= 0.21; 0.22 passes None and runs non-reentrant: the backends extra pins peft < 0.22)
    reentrant = ckpt and setup.method == "qlora" and setup.kbit_prep
    return ModelTrace(spec, setup, cfg, params, emb_dtype, full, input_rg, ckpt, spec.tie_word_embeddings, reentrant)


def _trainable_params(spec: ModelSpec, setup: Any, res: Any) -> list[tuple[str, Sz, str]]:
    """Trainable parameters in registration order, keyed as the recipes key them."""
    out: list[tuple[str, Sz, str]] = []
    if setup.method == "full":
        dt = res.trainable_dtype
        nb = DTYPE_BYTES[dt]
        h = spec.hidden_size
        out.append(("embed_tokens.weight", Sz(c=spec.embedding_params * nb), dt))
        for i in range(spec.num_layers):
            for lin in spec.layer_linears:
                out.append((f"layers.{i}.{lin.name}.weight", Sz(c=lin.in_features * lin.out_features * nb), dt))
                if lin.bias:
                    out.append((f"layers.{i}.{lin.name}.bias", Sz(c=lin.out_features * nb), dt))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out.append((f"layers.{i}.{norm}.weight", Sz(c=h * nb), dt))
        out.append(("norm.weight", Sz(c=spec.final_norm_params * nb), dt))
        if spec.head == "seq_cls":
            out.append(("score.weight", Sz(c=h * nb), dt))
        elif not spec.tie_word_embeddings:
            out.append(("lm_head.weight", Sz(c=spec.lm_head_params * nb), dt))
        return out
    r = setup.lora_rank
    for i in range(spec.num_layers):
        for lin in lora_targets(spec, setup):
            out.append((f"layers.{i}.{lin.name}.lora_A.weight", Sz(c=r * lin.in_features * 4), "fp32"))
            out.append((f"layers.{i}.{lin.name}.lora_B.weight", Sz(c=lin.out_features * r * 4), "fp32"))
    if spec.head == "seq_cls":  # peft's SEQ_CLS task trains a copy of `score` (modules_to_save)
        dt = res.non_linear_dtype
        out.append(("score.modules_to_save.default.weight", Sz(c=spec.hidden_size * DTYPE_BYTES[dt]), dt))
    return out


def _setup(rec: Recorder, mt: ModelTrace) -> None:
    """`from_config` (parameters in registration order, then buffers, then the untied output
    embedding, freed when `post_init` ties it), quantization states, adapters: allocated, never freed."""
    spec, setup = mt.spec, mt.setup
    res = resident(spec, setup)
    dt = res.non_linear_dtype
    nb = DTYPE_BYTES[dt]
    lin_nb = DTYPE_BYTES[res.linear_dtype] if res.linear_dtype in DTYPE_BYTES else None
    h = spec.hidden_size
    rec.alloc(Sz(c=spec.embedding_params * nb))
    for i in range(spec.num_layers):
        for lin in spec.layer_linears:
            n = lin.in_features * lin.out_features
            rec.alloc(Sz(c=n * lin_nb) if lin_nb else Sz(c=-(-n // 2)))
            if lin.bias:
                # kept: a 4-bit linear replaces its bias by a cast at the first forward (ops.linear4bit)
                rec.storages[f"layers.{i}.{lin.name}.bias"] = rec.alloc(Sz(c=lin.out_features * nb))
        for _norm in range(spec.layer_norm_params // h):
            rec.alloc(Sz(c=h * nb))
    rec.alloc(Sz(c=spec.final_norm_params * nb))
    if spec.head == "seq_cls":  # LlamaForSequenceClassification's score (hidden -> 1)
        rec.alloc(Sz(c=h * nb))
        if setup.method != "full":  # peft's ModulesToSaveWrapper: its trainable copy, beside the original
            rec.alloc(Sz(c=h * nb))
    elif not spec.tie_word_embeddings:
        rec.alloc(Sz(c=spec.lm_head_params * nb))
    for _buf in range(2):  # the rotary embedding's inv_freq and original_inv_freq
        rec.alloc(Sz(c=spec.buffer_bytes_fp32 // 2))
    if spec.tie_word_embeddings:
        rec.unref(rec.alloc(Sz(c=spec.embedding_params * nb)))
    if setup.method == "qlora":
        _quant_states(rec, spec, setup)
    if setup.method in ("lora", "qlora"):
        r = setup.lora_rank
        for _ in range(spec.num_layers):
            for lin in lora_targets(spec, setup):
                rec.alloc(Sz(c=r * lin.in_features * 4))
                rec.alloc(Sz(c=lin.out_features * r * 4))


def _quant_states(rec: Recorder, spec: ModelSpec, setup: Any) -> None:
    """Each Linear4bit's QuantState, module by module (planner.backends.dryrun._build._make_4bit_weight,
    planner.engine.resident.quant_state_bytes): absmax (fp32 per 64-block, or uint8 with double
    quantization), the 16-entry fp32 code; with double quantization the fp32 offset, the nested
    absmax (fp32 per 256 blocks) and its 256-entry fp32 code."""
    for _ in range(spec.num_layers):
        for lin in spec.layer_linears:
            blocks = -(-lin.in_features * lin.out_features // QUANT_BLOCK)
            rec.alloc(Sz(c=blocks if setup.double_quant else blocks * 4))
            rec.alloc(Sz(c=16 * 4))
            if setup.double_quant:
                rec.alloc(Sz(c=4))
                rec.alloc(Sz(c=-(-blocks // NESTED_BLOCK) * 4))
                rec.alloc(Sz(c=256 * 4))


# ---- the forward -----------------------------------------------------------------------------
def _prologue(tp: Tape, mt: ModelTrace) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """LlamaModel.forward before its layers, as transformers 5.25 writes it: position_ids =
    arange(S) + past_seen_tokens; create_causal_mask's check for packed sequences over the position
    ids expanded to the batch (find_packed_sequence_indices: diff with a prepended first value,
    != 1, cumsum, the last column == 0, all) whose temporaries go at once; the rotary embedding's
    cos and sin over the (1, S) positions (position_ids[..., None].float() * inv_freq, cat, cos and
    sin times attention_scaling, cast to the hidden dtype). Returns the position ids and (cos, sin)."""
    dt = mt.emb_dtype
    d = mt.spec.head_dim
    arange = tp.raw(Sz(s=8), "arange")
    pos = tp.raw(Sz(s=8), "position_ids")
    tp.drop(arange)
    first = tp.raw(Sz(b=8), "first_dummy_value")
    prepended = tp.raw(Sz(b=8, t=8), "diff.prepend")
    diff = tp.raw(Sz(t=8), "position_diff")
    tp.drop(prepended)
    ne = tp.raw(Sz(t=1), "position_diff != 1", "bool")
    packed = tp.raw(Sz(t=8), "packed_sequence_mask")
    tp.drop(ne)
    eq = tp.raw(Sz(b=1), "last == 0", "bool")
    every = tp.raw(Sz(c=1), "all", "bool")
    tp.drop(eq)
    tp.drop(first, diff, packed, every)
    mask = _eager_mask(tp, mt) if mt.cfg.attn == "eager" else None
    posf = tp.raw(Sz(s=4), "position_ids.float()", "fp32")
    freqs = tp.raw(Sz(s=d // 2 * 4), "freqs", "fp32")
    tp.drop(posf)
    emb = tp.raw(Sz(s=d * 4), "emb", "fp32")
    trig = []
    for name in ("cos", "sin"):
        f = tp.raw(Sz(s=d * 4), name, "fp32")
        scaled = tp.raw(Sz(s=d * 4), f"{name} * attention_scaling", "fp32")
        tp.drop(f)
        trig.append(scaled)
    if dt != "fp32":
        out = [tp.raw(Sz(s=d * DTYPE_BYTES[dt]), f"{n}.to(dtype)", dt) for n in ("cos", "sin")]
        tp.drop(*trig)
    else:
        out = trig
    tp.drop(freqs, emb)
    # cos and sin as the layer recipes read them: per-token elements (their sizes are the recorder's)
    for t in out:
        t.elems, t.dtype = tok(d), dt
    return pos, out, mask


def _eager_mask(tp: Tape, mt: ModelTrace) -> Tensor:
    """create_causal_mask for eager attention (transformers 5.25 masking_utils.eager_mask over
    sdpa_mask, no padding, no vmap): arange(B), arange(1), arange(S) + q_offset, arange(S) +
    kv_offset, the causal comparison `kv <= q` as an (S, S) bool table broadcast to the batch, then
    `torch.where(mask, zeros((), dtype), finfo(dtype).min)`: the (B, 1, S, S) additive mask in the
    hidden states' dtype, which lives until the model's forward returns."""
    dt = mt.emb_dtype
    e = DTYPE_BYTES[dt]
    batch = tp.raw(Sz(b=8), "batch_arange")
    head = tp.raw(Sz(c=8), "head_arange")
    idx = []
    for name in ("q", "kv"):
        a = tp.raw(Sz(s=8), f"arange({name})")
        idx.append(tp.raw(Sz(s=8), f"{name}_arange + offset"))
        tp.drop(a)
    causal = tp.raw(Sz(r=1), "kv_idx <= q_idx", "bool")
    tp.drop(batch, head, *idx)
    zero = tp.raw(Sz(c=e), "zeros(())", dt)
    low = tp.raw(Sz(c=e), "finfo.min", dt)
    mask = tp.raw(Sz(q=e), "causal_mask", dt)
    tp.drop(low, zero, causal)
    return mask


def _rotary_of(tp: Tape, mt: ModelTrace) -> list[Tensor]:
    """The rotary embedding over given position ids (generate's: one row per sequence): as `_prologue`'s,
    per token."""
    dt = mt.emb_dtype
    d = mt.spec.head_dim
    posf = tp.new(tok(1), "fp32", False, "position_ids.float()")
    freqs = tp.new(tok(d // 2), "fp32", False, "freqs")
    tp.drop(posf)
    emb = tp.new(tok(d), "fp32", False, "emb")
    trig = []
    for name in ("cos", "sin"):
        f = tp.new(tok(d), "fp32", False, name)
        scaled = tp.new(tok(d), "fp32", False, f"{name} * attention_scaling")
        tp.drop(f)
        trig.append(scaled)
    if dt != "fp32":
        out = [tp.new(tok(d), dt, False, f"{n}.to(dtype)") for n in ("cos", "sin")]
        tp.drop(*trig)
    else:
        out = trig
    tp.drop(freqs, emb)
    return out


def _embedding(tp: Tape, mt: ModelTrace, ids: Tensor, key: str) -> Tensor:
    spec = mt.spec
    w = tp.param(fixed(spec.embedding_params), mt.emb_dtype, mt.full, "embed_tokens.weight", key=key)
    node = tp.fn("embedding", (w,), (ids,), vocab=spec.vocab_size, hidden=spec.hidden_size)
    emb = tp.out(node, tp.new(tok(spec.hidden_size), mt.emb_dtype, mt.full, "inputs_embeds"))
    if mt.input_rg and not mt.full:
        # enable_input_require_grads: the embedding output becomes a leaf that requires grad
        emb.rg, emb.key = True, f"inputs_embeds@{emb.st.id if emb.st else 0}"
    return emb


def _layers(tp: Tape, mt: ModelTrace, x: Tensor, pos: Tensor, trig: list[Tensor], mask: Tensor | None = None) -> Tensor:
    """The decoder layers, each checkpointed (non-reentrant) when the plan says so. `mask`: eager
    attention's causal mask (a keyword argument of every layer, held by its checkpoint)."""
    rec = tp.rec
    cos, sin = trig
    layer = LAYERS[mt.cfg.family]
    # the layer call's keyword arguments that are tensors, in their order (attention_mask,
    # position_embeddings, position_ids): what a checkpoint holds beside the input
    kwargs = tuple(t for t in (mask, pos, cos, sin) if t is not None)
    for i in range(mt.spec.num_layers):
        tp.scope = f"layers.{i}"
        x.refs += 1  # the layer's own binding of its input (the recipes drop it once)
        if not mt.ckpt:
            out = layer(tp, x, cos, sin, mt.cfg)
        elif mt.reentrant:
            out = _checkpointed_reentrant(tp, mt, i, x, cos, sin, kwargs)
        else:
            out = _checkpointed(tp, mt, i, x, cos, sin, kwargs)
        tp.drop(x)  # the model's loop rebinds hidden_states
        x = out
    tp.scope = ""
    return x


def _checkpointed(tp: Tape, mt: ModelTrace, i: int, x: Tensor, cos: Tensor, sin: Tensor,
                  kwargs: tuple[Tensor, ...]) -> Tensor:
    """torch.utils.checkpoint(use_reentrant=False) around one decoder layer: the input saver keeps the
    layer's tensor arguments (its input, and `kwargs`: eager attention's mask, the position ids, cos and
    sin); the layer's forward runs saving nothing; its recompute re-runs the recipe."""
    from planner.engine.autograd import Frame

    rec = tp.rec
    layer = LAYERS[mt.cfg.family]

    def recompute(r: Recorder) -> None:
        rt = Tape(grad=True, keep_saved=True, rec=r, scope=f"layers.{i}")
        args = []
        for t in (cos, sin):
            c = Tensor(t.elems, t.dtype, t.rg, t.name, external=True, st=t.st)
            r.ref(t.st)
            r.recompute_tensors.append(c)
            args.append(c)
        # the recompute's bindings of the layer input (the recipes drop one of the two)
        xi = Tensor(x.elems, x.dtype, x.rg, x.name, refs=2, st=x.st)
        r.ref(x.st)
        r.recompute_tensors.append(xi)
        layer(rt, xi, args[0], args[1], mt.cfg)

    frame = Frame(recompute)
    for t in (x, *kwargs):
        rec.ref(t.st)
        frame.inputs.append(t.st)
    tp.keep_saved = False
    rec.frame = frame
    try:
        out = layer(tp, x, cos, sin, mt.cfg)
    finally:
        rec.frame = None
        tp.keep_saved = True
    if not frame.holders:  # nothing saved (no input requires grad): the frame goes now
        for st in frame.inputs:
            rec.unref(st)
        frame.inputs = []
    return out


def _checkpointed_reentrant(tp: Tape, mt: ModelTrace, i: int, x: Tensor, cos: Tensor, sin: Tensor,
                            kwargs: tuple[Tensor, ...]) -> Tensor:
    """torch.utils.checkpoint(use_reentrant=True) around one decoder layer: CheckpointFunction's node
    saves the layer input (the partial around the layer holds the keyword arguments, position ids and
    cos/sin, as long as the node lives: until the graph goes); the layer runs under no_grad; its
    backward re-runs the whole layer with grad (autocast's cache cleared when that forward ends) and
    runs a nested backward from the recomputed output into a detached copy of the input."""
    from planner.engine.autograd import ACCUMULATE_SEQ, Node, Storage

    rec = tp.rec
    layer = LAYERS[mt.cfg.family]
    scope = tp.scope

    def recompute(bw: Backward, g: Any, x_st: Any) -> Any:
        prev_graph, prev_leaves, prev_cache = rec.graph, rec.graph_leaves, rec.autocast_cache
        rec.graph, rec.graph_leaves, rec.autocast_cache = [], [], {}
        owner = Storage(-1, Sz())  # holds the detached input's .grad
        acc = Node(ACCUMULATE_SEQ, "accumulate_grad", [(x.elems, x.dtype, None)], key=f"{scope}.input",
                   meta={"leaf": owner})
        xd = Tensor(x.elems, x.dtype, True, "detached input", refs=2, st=x_st, edge=(acc, 0))
        rec.ref(x_st)
        out = layer(Tape(grad=True, rec=rec, scope=scope), xd, cos, sin, mt.cfg)
        rec.exit_autocast()
        rec.autocast_cache = prev_cache
        # torch.autograd.backward(outputs, args): the nested graph task holds the gradient until it ends
        root = bw.share(g)
        Backward(rec).run({out.edge[0]: {out.edge[1]: bw.share(g)}})
        bw.drop(root)
        gx, owner.grad = owner.grad, None
        # the recompute's locals go, and its graph with them
        Tape(rec=rec).drop(out, xd, xd)
        rec.release_graph()
        rec.graph, rec.graph_leaves = prev_graph, prev_leaves
        return gx

    node = tp.fn("checkpoint", (x,), (x,), recompute=recompute)
    if node is not None:
        for t in kwargs:
            rec.ref(t.st)
            rec.graph_leaves.append(t.st)
    out = layer(Tape(grad=False, rec=rec, scope=scope), x, cos, sin, mt.cfg)
    out.rg = node is not None
    return tp.out(node, out)


@formula("checkpoint")
def _checkpoint_backward(bw: Backward, n: Node, grads: list) -> list:
    """CheckpointFunction.backward (reentrant checkpointing): the recompute and its nested backward."""
    g = grads[0]
    if g is None:
        return [None]
    return [n.meta["recompute"](bw, g, n.saved[0])]


def causal_lm_forward(tp: Tape, mt: ModelTrace, ids: Tensor, labels: bool = True,
                      on_logits=None, positions: Tensor | None = None,
                      single_sequence: bool = False) -> tuple[Tensor | None, Tensor]:
    """`model(input_ids=ids, labels=ids)` of a Llama-family causal LM: (loss, logits). `on_logits`
    runs when the head's output exists (the tracker's loss phase starts there). `positions`: generate's
    forward, with its position ids and KV cache (tp.kv): no packed-sequence check, and logits of the last
    position only (logits_to_keep=1)."""
    spec = mt.spec
    emb_key = "embed_tokens.weight"
    hn = _backbone(tp, mt, ids, positions is None)
    head = Weight(spec.hidden_size, spec.vocab_size, mt.emb_dtype, mt.full)
    key = emb_key if spec.tie_word_embeddings else "lm_head.weight"
    if positions is None:
        # LlamaForCausalLM: self.lm_head(hidden_states[:, slice(0, None), :]) (an alias view)
        tp.op("view", "alias")
        hv = tp.view(hn, name="hidden_states[:, 0:]")
        logits = linear(tp, hv, head, mt.cfg.autocast, "lm_head", weight_key=key)
    else:
        # hidden_states[:, -1:, :]: one position per sequence
        hv = tp.view(hn, name="hidden_states[:, -1:]")
        per = tp.rec.per_sequence
        tp.rec.per_sequence = True
        logits = linear(tp, hv, head, mt.cfg.autocast, "lm_head", weight_key=key)
        tp.rec.per_sequence = per
    tp.drop(hv)
    if on_logits is not None:
        on_logits()
    loss = _causal_lm_loss(tp, logits, spec.vocab_size, single_sequence) if labels else None
    tp.drop(hn)
    return loss, logits


def _backbone(tp: Tape, mt: ModelTrace, ids: Tensor, mask: bool = True) -> Tensor:
    """LlamaModel.forward: the embedding, the prologue (`mask`: the causal mask and position ids of a
    forward over whole sequences; generate's forwards build rotary tables of their own positions), the
    decoder layers and the final norm: the normed hidden states."""
    x = _embedding(tp, mt, ids, "embed_tokens.weight")
    embeds = x
    x.refs += 1  # `inputs_embeds` and `hidden_states` both name it
    causal = None
    if mask:
        pos, trig, causal = _prologue(tp, mt)
    else:
        pos, trig = None, _rotary_of(tp, mt)
    x = _layers(tp, mt, x, pos, trig, causal)
    hn = rms_norm(tp, x, mt.cfg, "norm")
    tp.drop(x)
    # LlamaModel.forward returns: its locals go in their order (position_ids, inputs_embeds,
    # causal_mask, position_embeddings; the checkpoints keep theirs)
    if pos is not None:
        tp.drop(pos)
    tp.drop(embeds)
    if causal is not None:
        tp.drop(causal)
    tp.drop(*trig)
    return hn


def seq_cls_forward(tp: Tape, mt: ModelTrace, ids: Tensor) -> Tensor:
    """`model(input_ids=ids).logits` of LlamaForSequenceClassification (transformers 5.25): `score`
    (hidden -> 1) over every position, then the last non-pad token's: non_pad_mask = (ids != pad)
    .to(int32), token_indices = arange(S, int32), (token_indices * non_pad_mask).argmax(-1), and
    logits[arange(batch), last_non_pad_token] (IndexBackward0 saves the two index tensors); the
    model's locals (the per-position logits, the mask, the indices' arange) go when it returns."""
    hn = _backbone(tp, mt, ids)
    # with LoRA, peft's trainable copy of `score` (modules_to_save) runs
    copy = mt.setup.method != "full"
    score = Weight(mt.spec.hidden_size, 1, mt.emb_dtype, mt.full or copy)
    key = "score.modules_to_save.default.weight" if copy else "score.weight"
    logits = linear(tp, hn, score, mt.cfg.autocast, "score", weight_key=key)
    ne = tp.raw(Sz(t=1), "input_ids != pad_token_id", "bool")
    mask = tp.raw(Sz(t=4), "non_pad_mask", "int32")
    tp.drop(ne)
    positions = tp.raw(Sz(s=4), "token_indices", "int32")
    product = tp.raw(Sz(t=4), "token_indices * non_pad_mask", "int32")
    last = tp.raw(Sz(b=8), "last_non_pad_token")
    tp.drop(product)
    rows = tp.raw(Sz(b=8), "arange(batch_size)")
    node = tp.fn("index", (logits,), (rows, last))
    pooled = tp.out(node, _per_sequence(tp, Sz(b=1), logits.dtype, logits.rg, "pooled_logits"))
    tp.drop(hn, logits, mask, positions, rows, last)
    return pooled


@formula("index")
def _index_backward(bw: Backward, n: Node, grads: list) -> list:
    """IndexBackward0: grad.new_zeros(self.sizes()), index_put with accumulate into a new tensor; the
    zeros go."""
    g = grads[0]
    if g is None:
        return [None]
    elems, dtype = n.inputs[0][0], n.inputs[0][1]
    zeros = bw.new(elems, dtype)
    out = bw.new(elems, dtype)
    bw.drop(zeros)
    return [out]


def _causal_lm_loss(tp: Tape, logits: Tensor, vocab: int, single_sequence: bool = False) -> Tensor:
    """transformers' ForCausalLMLoss: logits.float(); labels padded by one (constant_pad_nd) and
    shifted (`labels[..., 1:].contiguous()`: a copy, except for one sequence, whose shifted view is
    contiguous already: then nll_loss keeps the padded labels); cross_entropy = log_softmax + nll_loss
    (mean): the loss and its total weight."""
    lf = cast(tp, logits, "fp32", "logits.float")
    padded = tp.raw(Sz(t=8, b=8), "labels padded")
    shifted = tp.view(padded, name="shift_labels") if single_sequence else tp.raw(Sz(t=8), "shift_labels")
    lv = tp.view(lf, name="logits.view(-1, V)")
    lsm = unary(tp, lv, "log_softmax", saves_output=True)
    node = tp.fn("nll_loss", (lsm,), (lsm, shifted))
    loss = tp.out(node, tp.new(fixed(1), "fp32", True, "loss"))
    weight = tp.raw(Sz(c=4), "total_weight", "fp32")
    if node is not None:
        tp.rec.save(node, weight.st)
    tp.drop(lv, lf, padded, shifted, lsm, weight)
    return loss


@formula("embedding")
def _embedding_backward(bw: Backward, n: Node, grads: list) -> list:
    """EmbeddingBackward0: embedding_dense_backward's weight gradient, then (a long index list) the
    kernel's per-segment workspace (planner.engine.runtime)."""
    g = grads[0]
    if g is None:
        return [None]
    out = bw.new(n.inputs[0][0], g.dtype)
    bw.workspace(SizeFn(_embedding_ws, (n.meta["vocab"], n.meta["hidden"])))
    return [out]


def _embedding_ws(batch: int, seq: int, vocab: int, hidden: int) -> int:
    return embedding_backward_workspace(batch * seq, vocab, hidden)


@formula("nll_loss")
def _nll_backward(bw: Backward, n: Node, grads: list) -> list:
    """NllLossBackward0: nll_loss_backward's gradient like the log-probabilities."""
    g = grads[0]
    return [bw.new(n.inputs[0][0], g.dtype) if g is not None else None]


# ---- optimizers -------------------------------------------------------------------------------
def _optimizer_step(rec: Recorder, mt: ModelTrace, first: bool) -> None:
    """`opt.step()` then `opt.zero_grad(set_to_none=True)`.
    - adamw (torch, foreach): the first step makes exp_avg and exp_avg_sq per parameter (zeros_like,
      in parameter order; `step` stays on the host); every step's `_foreach_sqrt(exp_avg_sqs)` makes one
      temporary per parameter, dropped when the step returns; the rest works in place.
    - adamw-fused: per parameter a device `step` (an fp32 scalar), exp_avg and exp_avg_sq, made at the
      first step; one kernel per group, nothing else allocated.
    - sgd (foreach, no momentum): `_foreach_add_` in place, nothing allocated."""
    name = mt.setup.optimizer
    params = [p for p in mt.trainable if p[0] in rec.grads]
    if name == "adamw":
        if first:
            for _key, size, _dt in params:
                rec.alloc(size)
                rec.alloc(size)
        temps = [rec.alloc(size) for _key, size, _dt in _foreach_groups(params)]
        for st in temps:
            rec.unref(st)
    elif name == "adamw-fused" and first:
        for _key, size, _dt in params:
            rec.alloc(Sz(c=4))
            rec.alloc(size)
            rec.alloc(size)
    elif name in ("adamw-8bit", "paged-adamw-8bit") and first:
        _bnb8bit_states(rec, params, paged=name.startswith("paged"))
    for key, _size, _dt in params:
        g = rec.grads.pop(key)
        rec.unref(g.st)


def _foreach_groups(params: list[tuple[str, Sz, str]]) -> list[tuple[str, Sz, str]]:
    """The parameters in the order a foreach optimizer's kernels take them: grouped by dtype
    (torch's `_group_tensors_by_device_and_dtype`, a C++ hash map), the groups in the reverse order
    of their first parameter (measured on torch 2.13 with fake CUDA tensors: fp32 then bf16 comes out
    bf16 first, fp32 bf16 fp16 as fp16 bf16 fp32), each group in parameter order. A LoRA reward
    model's bf16 copy of `score` beside its fp32 adapters is such a case."""
    groups: dict[str, list[tuple[str, Sz, str]]] = {}
    for p in params:
        groups.setdefault(p[2], []).append(p)
    return [p for dt in reversed(list(groups)) for p in groups[dt]]


def _bnb8bit_states(rec: Recorder, params: list[tuple[str, Sz, str]], paged: bool) -> None:
    """bitsandbytes 0.50's Optimizer2State.init_state at the first step, parameter by parameter
    (planner.engine.optimizers): below 4096 elements fp32 state1 and state2; else uint8 state1 and
    state2 with fp32 absmax1 and absmax2 per 256-block, the two 256-entry fp32 quantization maps made
    once before the first such parameter's. Paged states (>= 1e5 elements) are in unified memory,
    outside the caching allocator."""
    from planner.engine.optimizers import BNB_BLOCK, MIN_8BIT_SIZE, PAGED_MIN_NUMEL

    qmaps = False
    for _key, size, dt in params:
        n = size.c // DTYPE_BYTES[dt]
        device = not (paged and n >= PAGED_MIN_NUMEL)
        if n < MIN_8BIT_SIZE:
            if device:
                rec.alloc(Sz(c=n * 4))
                rec.alloc(Sz(c=n * 4))
            continue
        if not qmaps:
            qmaps = True
            rec.alloc(Sz(c=256 * 4))
            rec.alloc(Sz(c=256 * 4))
        if device:
            rec.alloc(Sz(c=n))
            rec.alloc(Sz(c=n))
        blocks = -(-n // BNB_BLOCK)
        rec.alloc(Sz(c=blocks * 4))
        rec.alloc(Sz(c=blocks * 4))


# ---- programs ------------------------------------------------------------------------------------
# bitsandbytes' gemm_4bit picks its fused kernel or the dequantize path by a per-architecture
# heuristic up to this many rows (backends/cuda/ops.py `_gemm_4bit_custom_max_m`); the trace follows
# the dequantize path, which it always takes above
BNB_CUSTOM_MAX_M = 1536
# ... and takes the fused kernel at or below this many rows whatever the card (`_GEMM_4BIT_CUSTOM_FLOOR_M`)
BNB_CUSTOM_FLOOR_M = 4
# Above this many rows the heuristic (`_gemm_4bit_use_custom_cuda`, bitsandbytes 0.50) takes the
# dequantize path on every card except for a small weight (N x K below BNB_SMALL_WEIGHT elements) that
# is short in K (2K < N), which an A100 below a third of a wave multiplies with its fused kernel up to
# BNB_CUSTOM_MAX_M rows; tests/test_engine_trace.py checks the rule against the installed heuristic
BNB_ARCH_FREE_M = 512
BNB_SMALL_WEIGHT = 4 * 1024 * 1024


def workload_trace(workload: Any, options: TraceOptions = TraceOptions(), steps: int = STEPS) -> SymbolicTrace:
    """The symbolic trace of a technique's workload, or TraceUnsupported naming what is not covered.
    A workload of one sequence per micro-batch has a trace of its own (`single_sequence`): some views
    of a one-row tensor are contiguous where those of several rows are copied."""
    limits = []
    quantized = [(lin.out_features, lin.in_features) for m in workload.models if m.setup.method == "qlora"
                 for lin in m.spec.layer_linears]
    if quantized:
        choice = bnb_kernel_choice(quantized)
        limits = [_bnb_generation_choice(choice) if workload.technique == "generate" else choice]
    if workload.technique == "sft":
        use = workload.models[0]
        single = workload.phases[0].batch == 1
        return SymbolicTrace(sft_trace(use.spec, use.setup, options, steps, single), limits=limits)
    if workload.technique == "dpo":
        return SymbolicTrace(dpo_trace(workload, options, steps), limits=limits)
    if workload.technique == "rm":
        return SymbolicTrace(rm_trace(workload, options, steps), limits=limits)
    if workload.technique == "distill":
        return SymbolicTrace(distill_trace(workload, options, steps), limits=limits)
    if workload.technique == "generate":
        return SymbolicTrace(generate_trace(workload, options, steps, workload.phases[0].batch == 1), limits=limits)
    raise TraceUnsupported(f"the engine's allocation trace covers the sft, rm, dpo, distill and generate techniques, not "
                           f"{workload.technique} yet")


def bnb_card_free(n: int, k: int, rows: int) -> bool:
    """bitsandbytes takes the dequantize path for a 4-bit [N, K] weight over `rows` rows on every card:
    past BNB_CUSTOM_MAX_M rows, or past BNB_ARCH_FREE_M unless the weight is small and short in K."""
    return rows > BNB_CUSTOM_MAX_M or (rows > BNB_ARCH_FREE_M and not (n * k < BNB_SMALL_WEIGHT and 2 * k < n))


def bnb_kernel_choice(shapes: list[tuple[int, int]]):
    """The trace's limit for 4-bit linears of these [N, K] weights: fn(B, S) -> why the trace does not
    hold at B x S rows a forward (bitsandbytes picks its kernel by the card there), or None."""
    def limit(batch: int, seq: int) -> str | None:
        m = batch * seq
        if all(bnb_card_free(n, k, m) for n, k in shapes):
            return None
        floor = BNB_ARCH_FREE_M if all(bnb_card_free(n, k, BNB_CUSTOM_MAX_M) for n, k in shapes) else BNB_CUSTOM_MAX_M
        return (f"a 4-bit linear over {m} tokens: bitsandbytes picks its fused kernel or the dequantize path by a "
                f"per-architecture heuristic up to {floor} tokens per micro-batch for this model's weights; the "
                "engine's trace covers the dequantize path it takes above that on every card")
    return limit


def _bnb_generation_choice(choice):
    """A 4-bit generation's kernels: the prefill's rows (batch x prompt) as `choice` allows them (the
    dequantize path on every card), a decode step's (one per sequence) up to BNB_CUSTOM_FLOOR_M the
    fused kernel, on every card; in between bitsandbytes decides by the card."""
    def limit(batch: int, seq: int) -> str | None:
        reason = choice(batch, seq)
        if reason:
            return f"the prefill: {reason}"
        if batch > BNB_CUSTOM_FLOOR_M:
            return (f"4-bit generation of {batch} sequences: each decode step multiplies {batch} rows, where "
                    f"bitsandbytes picks its fused kernel or the dequantize path by a per-architecture heuristic "
                    f"(above {BNB_CUSTOM_FLOOR_M} rows); the engine's trace covers decode steps of up to "
                    f"{BNB_CUSTOM_FLOOR_M} sequences (its fused kernel on every card)")
        return None
    return limit


def _recorder(options: TraceOptions) -> Recorder:
    rec = Recorder()
    rec.sdpa_backend = options.sdpa_backend
    if options.warm:
        rec.alloc(Sz(c=options.workspace_bytes))
    else:
        rec.workspace = Sz(c=options.workspace_bytes)
    return rec


def _reset(rec: Recorder) -> None:
    """`reset_peak_memory_stats()` once the models and optimizers exist."""
    rec.event("phase", "reset")
    rec.phase = "reset"
    rec.event("reset")


def _training_steps(options: TraceOptions, models: "list[ModelTrace]", steps: int, accum: int,
                    micro, forwards: int = 1) -> list[tuple]:
    """The events of a training technique's program: the models set up (the trained one first: the
    optimizer follows it) and the peak reset; then per step `accum` micro-batches, each the batch's
    input ids (`ids = ...`, rebound) and `micro(step, tp, ids, rebind) -> loss` (its forward, binding
    the step's other locals with `rebind(name, t)`; `tp.rec` the recorder), then `loss.backward()`
    (with accumulation `(loss / accum).backward()`: a 0-dim quotient whose backward divides the
    gradient into a new one; the later micro-batches' gradients are added into .grad in place,
    planner.engine.autograd); the optimizer step; the step's locals go when it returns.
    A later micro-batch rebinds each local once its new value exists (a loop over the same statements):
    the old one goes then, and with the old loss the graph it reached (reentrant checkpoints' inputs).
    `forwards`: the micro-batch's ids hold that many of the trace's batches (a pair's chosen and rejected
    sequences through two forwards of B each: 2 x B rows)."""
    rec = _recorder(options)
    for mt in models:
        _setup(rec, mt)
    _reset(rec)
    for step in range(steps):
        held: dict[str, Tensor] = {}
        graph = None
        for _ in range(accum):
            tp = Tape(grad=True, rec=rec)

            def rebind(name: str, t: Tensor, tp: Tape = tp) -> None:
                old = held.pop(name, None)
                held[name] = t
                if old is not None:
                    tp.drop(old)
                    if name == "loss":
                        rec.release_graph(graph)

            ids = tp.raw(Sz(t=8 * forwards), "input_ids")
            rebind("ids", ids)
            loss = micro(step, tp, ids, rebind)
            rec.exit_autocast()  # the forward phase's autocast region ends
            rec.set_phase(f"{step}.backward")
            if accum == 1:
                rec.backward(loss.edge, loss.elems, loss.dtype)
            else:
                scaled = unary(tp, loss, "loss / grad_accum")
                rec.backward(scaled.edge, scaled.elems, scaled.dtype)
                tp.drop(scaled)
                graph = rec.take_graph()
        rec.set_phase(f"{step}.optimizer")
        _optimizer_step(rec, models[0], first=step == 0)
        tp.drop(*held.values())
        if graph is not None:
            rec.release_graph(graph)
        rec.release_graph()
        rec.set_phase(f"{step}.between_steps")
    return rec.events


def sft_trace(spec: ModelSpec, plan: Any, options: TraceOptions = TraceOptions(), steps: int = STEPS,
              single_sequence: bool = False) -> list[tuple]:
    """The symbolic events of the sft technique's program (plugins/training.py's `sft_step`);
    `single_sequence`: micro-batches of one sequence."""
    mt = model_trace(spec, plan, trainable=True)
    mt.cfg = dataclasses.replace(mt.cfg, one_sequence=single_sequence)

    def micro(step: int, tp: Tape, ids: Tensor, rebind) -> Tensor:
        tp.rec.set_phase(f"{step}.forward")
        loss, logits = causal_lm_forward(tp, mt, ids, on_logits=_loss_phase(tp.rec, step),
                                         single_sequence=single_sequence)
        # `out = model(...)`: the previous micro-batch's loss and logits go once the forward returns
        rebind("logits", logits)
        rebind("loss", loss)
        return loss

    return _training_steps(options, [mt], steps, getattr(plan, "grad_accum", 1), micro)


# ---- dpo ------------------------------------------------------------------------------------------
def _loss_phase(rec: Recorder, step: int):
    """The tracker's loss phase: from the output head's forward on, inside a forward phase."""
    def mark() -> None:
        if rec.phase == f"{step}.forward":
            rec.set_phase(f"{step}.loss")
    return mark


def _sequence_logprobs(tp: Tape, mt: ModelTrace, ids: Tensor, on_logits=None, how: str = "full") -> Tensor:
    """plugins/logprobs.py `sequence_logprobs(model, ids, how)`: `out = model(input_ids=ids,
    use_cache=False)`; `full`: log_softmax(out.logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    .sum(-1); `selective`: TRL's selective_log_softmax(out.logits, ids).sum(-1) (its CUDA kernel:
    `_selective_log_softmax`); one fp32 value per sequence; `out` and its logits go when it returns."""
    _, logits = causal_lm_forward(tp, mt, ids, labels=False, on_logits=on_logits)
    if how == "selective":
        per_token = _selective_log_softmax(tp, logits, ids)
        node = tp.fn("sum_rows", (per_token,))
        lp = tp.out(node, _per_sequence(tp, Sz(b=1), "fp32", per_token.rg, "log-probs summed"))
        tp.drop(per_token, logits)
        return lp
    lf = cast(tp, logits, "fp32", "logits.float")
    lsm = unary(tp, lf, "log_softmax", saves_output=True)
    tp.drop(lf)
    node = tp.fn("gather", (lsm,), (ids,))  # GatherBackward0 saves the index
    gathered = tp.out(node, tp.new(tok(1), "fp32", lsm.rg, "gather"))
    tp.drop(lsm)
    squeezed = tp.view(gathered, name="squeeze")
    node = tp.fn("sum_rows", (squeezed,))
    lp = tp.out(node, _per_sequence(tp, Sz(b=1), "fp32", squeezed.rg, "log-probs summed"))
    tp.drop(squeezed, gathered, logits)
    return lp


def _selective_log_softmax(tp: Tape, logits: Tensor, ids: Tensor) -> Tensor:
    """TRL 1.16.0's selective_log_softmax(logits, ids) on CUDA: its Triton `_LogProbEntropyFunction`
    (what planner.backends.dryrun._patches._LogProbEntropyKernel allocates) writes four fp32 per-token
    vectors (log-probs, entropy, log Z, expected logit) and saves the logits, the ids, log Z and the
    expected logit for its backward; the entropy, unused, goes when selective_log_softmax returns.
    Under no_grad nothing is saved: log Z and the expected logit go with the forward."""
    node = tp.fn("logprob_entropy", (logits,), (logits, ids))
    logprobs = tp.out(node, tp.new(tok(1), "fp32", logits.rg, "logprobs"))
    entropy = tp.out(node, tp.new(tok(1), "fp32", logits.rg, "entropy"))
    log_z = tp.new(tok(1), "fp32", False, "log Z")
    expected = tp.new(tok(1), "fp32", False, "expected logit")
    if node is not None:
        tp.rec.save(node, log_z.st)
        tp.rec.save(node, expected.st)
    tp.drop(log_z, expected)
    tp.drop(entropy)
    return logprobs


@formula("logprob_entropy")
def _logprob_entropy_backward(bw: Backward, n: Node, grads: list) -> list:
    """_LogProbEntropyFunction.backward: one gradient like the logits (torch.empty_like), written by
    the kernel; its saved tensors go after it."""
    if all(g is None for g in grads):
        return [None]
    elems, dtype, _ = n.inputs[0]
    return [bw.new(elems, dtype)]


def _per_sequence(tp: Tape, elems: Sz, dtype: str, rg: bool, name: str) -> Tensor:
    """A tensor of `elems` elements, a size with a batch term (per sequence) the tape's own elements
    cannot express: only the recorder allocates it."""
    t = Tensor(elems, dtype, rg and tp.grad, name, external=True)
    if tp.rec is not None:
        t.st = tp.rec.alloc(elems * DTYPE_BYTES[dtype])
    return t


@formula("gather")
def _gather_backward(bw: Backward, n: Node, grads: list) -> list:
    """GatherBackward0: `grad.new_zeros(self.sizes())`, then scatter_add into a new tensor; the zeros go."""
    g = grads[0]
    if g is None:
        return [None]
    zeros = bw.new(n.inputs[0][0], g.dtype)
    out = bw.new(n.inputs[0][0], g.dtype)
    bw.drop(zeros)
    return [out]


@formula("sum_rows")
def _sum_rows_backward(bw: Backward, n: Node, grads: list) -> list:
    """SumBackward1 over the last dimension: the gradient unsqueezed and expanded (a view)."""
    g = grads[0]
    return [bw.share(g, n.inputs[0][0]) if g is not None else None]


@formula("log_sigmoid")
def _log_sigmoid_backward(bw: Backward, n: Node, grads: list) -> list:
    """LogSigmoidBackward0: log_sigmoid_backward(grad, self, buffer), like the input."""
    g = grads[0]
    return [bw.new(n.inputs[0][0], g.dtype) if g is not None else None]


def _dpo_loss(tp: Tape, pol: Tensor, ref: Tensor, pairs_elems: Sz, on_margin=None) -> tuple[Tensor, list[Tensor]]:
    """plugins/alignment.py: margin = (pol[:B] - pol[B:]) - (ref[:B] - ref[B:]);
    loss = -F.logsigmoid(beta * margin).mean(). Returns the loss and what the step keeps bound
    (`margin`); `on_margin` runs once the margin exists (a later micro-batch rebinds the previous one)."""
    halves = []
    for t in (pol, ref):
        a = tp.view(t, "slice", elems=pairs_elems, name="chosen")
        b = tp.view(t, "slice", elems=pairs_elems, name="rejected")
        d = binary(tp, a, b, "chosen - rejected", saves=False, aten="sub")
        tp.drop(a, b)
        halves.append(d)
    margin = binary(tp, halves[0], halves[1], "margin", saves=False, aten="sub")
    tp.drop(*halves)
    if on_margin is not None:
        on_margin(margin)
    scaled = unary(tp, margin, "beta * margin")
    loss = _neg_logsigmoid_mean(tp, scaled, pairs_elems)
    tp.drop(scaled)
    return loss, [margin]


def _neg_logsigmoid_mean(tp: Tape, x: Tensor, pairs_elems: Sz) -> Tensor:
    """-F.logsigmoid(x).mean() over one value per pair: log_sigmoid_forward returns the output and a
    buffer (its node saves the input and the buffer); the mean; its negation."""
    node = tp.fn("log_sigmoid", (x,), (x,))
    out = tp.out(node, _per_sequence(tp, pairs_elems, x.dtype, x.rg, "logsigmoid"))
    buffer = _per_sequence(tp, pairs_elems, x.dtype, False, "log_sigmoid buffer")
    if node is not None:
        tp.rec.save(node, buffer.st)
    tp.drop(buffer)
    mean = unary(tp, out, "mean", elems=fixed(1))
    tp.drop(out)
    loss = unary(tp, mean, "neg")
    tp.drop(mean)
    return loss


def dpo_trace(workload: Any, options: TraceOptions = TraceOptions(), steps: int = STEPS) -> list[tuple]:
    """The dpo technique's program (plugins/alignment.py `_dpo_step`, full log-softmax, chosen and
    rejected in one forward): ids of 2 x batch sequences; the policy's log-probs under the forward
    phase's autocast; the reference's (a frozen copy, the policy with its adapters disabled, or
    precomputed zeros) under no_grad, after the policy's (TRL's order) or before; the loss; backward;
    the optimizer."""
    plan = workload.models[0].setup
    if plan.logprobs not in ("full", "selective"):
        raise TraceUnsupported("the engine's allocation trace covers dpo with --logprobs full or selective, not "
                               "TRL's fused head yet")
    policy = model_trace(workload.model("policy").spec, workload.model("policy").setup, trainable=True)
    reference = None
    if plan.ref_logprobs == "model":
        if plan.method == "full":
            use = workload.model("reference")
            reference = model_trace(use.spec, use.setup, trainable=False)
            # TRL scores the reference inside compute_loss, under the plan's autocast
            reference.cfg = dataclasses.replace(reference.cfg, autocast=policy.cfg.autocast)
        else:
            # peft's disable_adapter(): the policy's base layers alone, no graph
            reference = dataclasses.replace(policy, cfg=dataclasses.replace(policy.cfg, loras={}), ckpt=False,
                                            input_rg=False)
    models = [policy] + ([reference] if reference is not None and plan.method == "full" else [])
    pairs = _PairForward.of(plan)

    def logprobs_of(mt: ModelTrace, on_logits=None):
        return lambda tp, x: _sequence_logprobs(tp, mt, x, on_logits=on_logits, how=plan.logprobs)

    def micro(step: int, tp: Tape, ids: Tensor, rebind) -> Tensor:
        # the step's locals (ids, ref, pol, margin, loss): plugins/alignment.py `_dpo_micro_batch`
        rec = tp.rec

        def reference_logprobs() -> Tensor:
            rec.set_phase(f"{step}.reference")
            nt = Tape(grad=False, rec=rec)
            if reference is None:  # torch.zeros(2 x batch): log-probs computed beforehand
                return _per_sequence(nt, pairs.rows, "fp32", False, "precomputed log-probs")
            return pairs(nt, ids, logprobs_of(reference), "torch.cat(log-probs)")

        if plan.reference_pass == "before":
            rebind("ref", ref := reference_logprobs())
        rec.set_phase(f"{step}.forward")
        # the policy's second forward starts back in the forward phase its first one's head left
        pol = pairs(tp, ids, logprobs_of(policy, _loss_phase(rec, step)), "torch.cat(log-probs)",
                    phase=f"{step}.forward")
        rebind("pol", pol)
        if plan.reference_pass != "before":
            rebind("ref", ref := reference_logprobs())
        loss, _ = _dpo_loss(tp, pol, ref, pairs.side, on_margin=lambda m: rebind("margin", m))
        rebind("loss", loss)
        return loss

    return _training_steps(options, models, steps, plan.grad_accum, micro, forwards=pairs.forwards)


# ---- rm -------------------------------------------------------------------------------------------
def rm_trace(workload: Any, options: TraceOptions = TraceOptions(), steps: int = STEPS) -> list[tuple]:
    """The rm technique's program (plugins/alignment.py `rm_step`, chosen and rejected in one forward):
    ids of 2 x batch sequences; rewards = model(input_ids=ids).logits.squeeze(-1) (`seq_cls_forward`);
    loss = -logsigmoid(rewards[:B] - rewards[B:]).mean() in the model's dtype; backward; the optimizer;
    with grad_accum micro-batches the step's locals rebound (as `dpo_trace`)."""
    use = workload.models[0]
    plan = use.setup
    mt = model_trace(use.spec, plan, trainable=True)
    pairs = _PairForward.of(plan)

    def rewards_of(tp: Tape, x: Tensor) -> Tensor:
        logits = seq_cls_forward(tp, mt, x)
        rewards = tp.view(logits, name="squeeze(-1)")
        tp.drop(logits)  # `.logits` of the output, which goes at once: `rewards` views it
        return rewards

    def micro(step: int, tp: Tape, ids: Tensor, rebind) -> Tensor:
        tp.rec.set_phase(f"{step}.forward")
        rewards = pairs(tp, ids, rewards_of, "torch.cat(rewards)")
        rebind("rewards", rewards)
        a = tp.view(rewards, "slice", elems=pairs.side, name="chosen")
        b = tp.view(rewards, "slice", elems=pairs.side, name="rejected")
        d = binary(tp, a, b, "chosen - rejected", saves=False, aten="sub")
        tp.drop(a, b)
        loss = _neg_logsigmoid_mean(tp, d, pairs.side)
        tp.drop(d)
        rebind("loss", loss)
        return loss

    return _training_steps(options, [mt], steps, plan.grad_accum, micro, forwards=pairs.forwards)


@dataclass(frozen=True)
class _PairForward:
    """plugins/alignment.py `_pair_rows` and `_pair_forward`: a preference step's chosen-then-rejected
    sequences in one forward (the trace's batch B is 2 x pairs) or in two of B = pairs each, views of
    the ids, whose per-sequence outputs torch.cat joins."""

    separate: bool

    @classmethod
    def of(cls, plan: Any) -> "_PairForward":
        return cls(plan.pair_forward != "concatenated")

    @property
    def forwards(self) -> int:
        return 2 if self.separate else 1

    @property
    def side(self) -> Sz:
        """The chosen (or rejected) rows: one per pair."""
        return Sz(b=1) if self.separate else Sz(b=0.5)

    @property
    def rows(self) -> Sz:
        """All 2 x pairs rows."""
        return Sz(b=2) if self.separate else Sz(b=1)

    def __call__(self, tp: Tape, ids: Tensor, fn, name: str, phase: str = "") -> Tensor:
        """fn(tp, ids) -> a per-sequence tensor, over all rows or per half, concatenated (`name`); `phase`:
        the tracker's phase each half's forward starts in."""
        if not self.separate:
            return fn(tp, ids)
        halves = []
        for which in ("chosen", "rejected"):
            if phase:
                tp.rec.set_phase(phase)
            part = tp.view(ids, "slice", name=f"ids[{which}]")
            halves.append(fn(tp, part))
            tp.drop(part)
        out = _cat_rows(tp, halves, name)
        tp.drop(*halves)
        return out


def _cat_rows(tp: Tape, parts: list[Tensor], name: str) -> Tensor:
    """torch.cat of per-sequence tensors along the batch: a new tensor of all their rows (CatBackward0:
    each part's gradient a narrow view of the output's)."""
    elems = sum((p.elems for p in parts), Sz())
    out = _per_sequence(tp, elems, parts[0].dtype, any(p.rg for p in parts), name)
    if out.rg:
        node = tp.fn("cat", tuple(parts))
        out = tp.out(node, out)
    return out


# ---- distill --------------------------------------------------------------------------------------
def distill_trace(workload: Any, options: TraceOptions = TraceOptions(), steps: int = STEPS) -> list[tuple]:
    """The distill technique's program (plugins/distillation.py `distill_step`): the frozen teacher's
    logits under no_grad (its phase), the student's forward, kl_div over both log-softmaxes in fp32
    (`_kl_loss`); both logits bound until the step ends (or the next micro-batch rebinds them)."""
    plan = workload.models[0].setup
    student = model_trace(workload.model("student").spec, plan, trainable=True)
    t_use = workload.model("teacher")
    teacher = model_trace(t_use.spec, t_use.setup, trainable=False)
    # the teacher's forward runs outside autocast (distill_step enters none): a frozen 4-bit teacher's
    # LoRA layers cast their input to the adapters' fp32 and the result back
    teacher.cfg = dataclasses.replace(teacher.cfg, autocast=None)

    def micro(step: int, tp: Tape, ids: Tensor, rebind) -> Tensor:
        rec = tp.rec
        rec.set_phase(f"{step}.teacher")
        _, t_logits = causal_lm_forward(Tape(grad=False, rec=rec), teacher, ids, labels=False)
        rebind("t_logits", t_logits)
        rec.set_phase(f"{step}.forward")
        _, s_logits = causal_lm_forward(tp, student, ids, labels=False, on_logits=_loss_phase(rec, step))
        rebind("s_logits", s_logits)
        loss = _kl_loss(tp, s_logits, t_logits)
        if plan.hard_label_weight > 0:  # loss = (1 - w) * loss + w * ce
            ce = _cross_entropy(tp, s_logits, ids)
            rebind("ce", ce)
            a = unary(tp, loss, "(1 - w) * loss")
            b = unary(tp, ce, "w * ce")
            mixed = binary(tp, a, b, "mixed loss", saves=False, aten="add")
            tp.drop(a, b, loss)
            loss = mixed
        rebind("loss", loss)
        return loss

    return _training_steps(options, [student, teacher], steps, plan.grad_accum, micro)


def _cross_entropy(tp: Tape, s_logits: Tensor, ids: Tensor) -> Tensor:
    """F.cross_entropy(s.float().view(-1, V), ids.view(-1)): log_softmax (its output saved) and nll_loss
    (saving the target, a view of the ids, and its total weight); the float copy and its view are the
    call's temporaries."""
    cf = cast(tp, s_logits, "fp32", "ce.float")
    cv = tp.view(cf, name="view(-1, V)")
    lsm = unary(tp, cv, "ce.log_softmax", saves_output=True)
    node = tp.fn("nll_loss", (lsm,), (lsm, ids))
    ce = tp.out(node, tp.new(fixed(1), "fp32", True, "ce"))
    weight = tp.raw(Sz(c=4), "total_weight", "fp32")
    if node is not None:
        tp.rec.save(node, weight.st)
    tp.drop(cv, cf, lsm, weight)
    return ce


def _kl_loss(tp: Tape, s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """F.kl_div(log_softmax(s.float()), log_softmax(t.float()), log_target=True, reduction="batchmean"):
    exp(target) * (target - input) (MulBackward0 saves exp(target)), summed, divided by the batch; the
    two log-softmaxes are the call's arguments (the student's stays saved by its node)."""
    sf = cast(tp, s_logits, "fp32", "student.float")
    s_lsm = unary(tp, sf, "student.log_softmax", saves_output=True)
    tp.drop(sf)
    tf = cast(tp, t_logits, "fp32", "teacher.float")
    t_lsm = unary(tp, tf, "teacher.log_softmax")
    tp.drop(tf)
    diff = binary(tp, t_lsm, s_lsm, "kl.target_minus_input", saves=False, aten="sub")
    exp_t = unary(tp, t_lsm, "kl.exp")
    prod = binary(tp, exp_t, diff, "kl.mul", saves=True)
    tp.drop(diff, exp_t)
    total = unary(tp, prod, "kl.sum", elems=fixed(1), grad="sum_rows")  # SumBackward0: an expand (a view)
    tp.drop(prod)
    loss = unary(tp, total, "kl.batchmean", elems=fixed(1))
    tp.drop(s_lsm, t_lsm, total)
    return loss


# ---- generate -------------------------------------------------------------------------------------
class KVCache:
    """transformers' DynamicCache as its layers grow it: `torch.cat([keys, key_states], dim=-2)` makes
    the grown keys (then values) of a layer and the old ones go."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.layers: dict[str, list] = {}

    def update(self, tp: Tape, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rec = self.rec
        held = self.layers.setdefault(tp.scope, [None, None, Sz(), Sz()])
        out = []
        for i, new in enumerate((k, v)):
            size = held[2 + i] + sz_of(new.elems, new.dtype, rec.per_sequence)
            st = rec.alloc(size)
            if held[i] is not None:
                rec.unref(held[i])
            held[i], held[2 + i] = st, size
            rec.ref(st)  # the attention's binding of the cache's tensor
            out.append(Tensor(new.elems, new.dtype, False, "cache", external=True, st=st))
        return out[0], out[1]

    def release(self) -> None:
        for held in self.layers.values():
            for st in held[:2]:
                self.rec.unref(st)
        self.layers = {}


def generate_trace(workload: Any, options: TraceOptions = TraceOptions(), steps: int = STEPS,
                   single_sequence: bool = False) -> list[tuple]:
    """The generate technique's program (plugins/generation.py): ids of batch x prompt tokens, then
    `model.generate(ids, attention_mask=ones, max_new_tokens=n, min_new_tokens=n, do_sample=False)` as
    transformers 5.25 runs it with its DynamicCache; every decode step runs the model (the sizes: B the
    batch, S the prompt length)."""
    use = workload.models[0]
    ph = workload.phases[0]
    if use.setup.attn != "sdpa":
        raise TraceUnsupported("eager attention in generate(): each forward builds its (B, 1, new, cached) mask, "
                               "which the engine's trace does not cover yet (training with eager attention is traced)")
    mt = model_trace(use.spec, use.setup, trainable=False)
    # generate runs outside any autocast region
    mt.cfg = dataclasses.replace(mt.cfg, autocast=None)
    rec = _recorder(options)
    _setup(rec, mt)
    _reset(rec)
    for step in range(steps):
        tp = Tape(grad=False, rec=rec)
        ids = tp.raw(Sz(t=8), "input_ids")
        out = _generate(tp, mt, ids, ph.new_tokens, step, single_sequence)
        tp.drop(ids, out)  # the step's locals go when it returns (generate's output among them)
        rec.set_phase(f"{step}.between_steps")
    return rec.events


def _generate(tp: Tape, mt: ModelTrace, ids: Tensor, new_tokens: int, step: int, single_sequence: bool) -> Tensor:
    """GenerationMixin.generate's greedy loop; returns the output ids. Sizes of its bookkeeping, per the
    tensor it makes (B sequences, S prompt tokens, V vocabulary, int64 ids): the attention mask and the
    position ids (B x S, from the mask's cumsum), the special-token checks, `unfinished_sequences` (B),
    and per step: the grown position ids and ids (B x (S + k)), the last position's logits in fp32,
    two min-length logits processors (each an arange and isin over V, a clone of the scores,
    torch.where), argmax and the padding arithmetic (B), the stopping criteria (B flags), and the
    next step's inputs (two clones of B)."""
    rec = tp.rec
    V = mt.spec.vocab_size

    def temp(*sizes: Sz) -> None:
        ts = [tp.raw(z, "temporary") for z in sizes]
        tp.drop(*ts)

    mask = tp.raw(Sz(t=8), "attention_mask")  # ones_like(ids)
    specials = [tp.raw(Sz(c=8), "special token") for _ in range(2)]  # eos and pad as tensors
    # special-token checks (isin / any, lt / any; with several sequences the right-padding one, eq / any)
    for first in (Sz(c=1), Sz(c=1)) + (() if single_sequence else (Sz(b=1),)):
        a = tp.raw(first, "check")
        b = tp.raw(Sz(c=1), "any")
        tp.drop(a, b)
    # position_ids = attention_mask.long().cumsum(-1) - 1; masked_fill_(attention_mask == 0, 1)
    cs = tp.raw(Sz(t=8), "cumsum")
    sub = tp.raw(Sz(t=8), "cumsum - 1")
    tp.drop(cs)
    eq = tp.raw(Sz(t=1), "mask == 0")
    positions = tp.raw(Sz(t=8), "position_ids")
    tp.drop(eq, sub)
    for _ in range(2):  # the mask's checks: all ones, none below zero
        a = tp.raw(Sz(t=1), "check")
        b = tp.raw(Sz(c=1), "all/any")
        tp.drop(a, b)
    unfinished = tp.raw(Sz(b=8), "unfinished_sequences")
    model_ids = tp.raw(Sz(t=8), "model input ids")
    rec.set_phase(f"{step}.prefill")
    tp.kv = KVCache(rec)
    _, logits = causal_lm_forward(tp, mt, model_ids, labels=False, positions=positions)
    tp.drop(model_ids)
    grown_positions = None
    grown_ids = None
    logits32 = scores = next_tokens = None
    clones: list[Tensor] = []
    for k in range(new_tokens):
        if k > 0:
            # prepare_inputs_for_generation: the last position's ids and position ids
            new_clones = [tp.raw(Sz(b=8), "clone") for _ in range(2)]
            tp.drop(*clones)
            clones = new_clones
            if k == 1:
                rec.set_phase("0.decode")
            rec.per_sequence = True
            _, logits = causal_lm_forward(tp, mt, clones[0], labels=False, positions=clones[1])
            rec.per_sequence = False
        # _update_model_kwargs_for_generation: the position ids grow by one
        a = tp.raw(Sz(c=8), "arange")
        b = tp.raw(Sz(b=8), "+")
        tp.drop(a)
        c = tp.raw(Sz(b=8), "+")
        tp.drop(b)
        grown = tp.raw(Sz(t=8, b=8 * (k + 1)), "position_ids grown")
        tp.drop(c)
        if grown_positions is not None:
            tp.drop(grown_positions)
        grown_positions = grown
        # next_token_logits = logits[:, -1].to(copy=True, dtype=float32)
        n32 = tp.raw(Sz(b=V * 4), "next_token_logits")
        if logits32 is not None:
            tp.drop(logits32)
        logits32 = n32
        # MinLengthLogitsProcessor, then MinNewTokensLengthLogitsProcessor
        ar, isin = tp.raw(Sz(c=V * 8), "arange(V)"), tp.raw(Sz(c=V), "isin")
        cl, st = tp.raw(Sz(b=V * 4), "scores.clone()"), tp.raw(Sz(c=4), "scalar_tensor")
        first = tp.raw(Sz(b=V * 4), "torch.where")
        tp.drop(st, cl, ar, isin)
        cl = tp.raw(Sz(b=V * 4), "scores.clone()")
        ar, isin, st = tp.raw(Sz(c=V * 8), "arange(V)"), tp.raw(Sz(c=V), "isin"), tp.raw(Sz(c=4), "scalar_tensor")
        second = tp.raw(Sz(b=V * 4), "torch.where")
        tp.drop(st, cl, ar, isin, first)
        if scores is not None:
            tp.drop(scores)
        scores = second
        # next_tokens = argmax; next_tokens * unfinished + pad * (1 - unfinished)
        am = tp.raw(Sz(b=8), "argmax")
        if next_tokens is not None:
            tp.drop(next_tokens)
        m1, r = tp.raw(Sz(b=8), "mul"), tp.raw(Sz(b=8), "rsub")
        m2 = tp.raw(Sz(b=8), "mul")
        tp.drop(r)
        next_tokens = tp.raw(Sz(b=8), "next_tokens")
        tp.drop(m1, m2, am)
        # input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        cat = tp.raw(Sz(t=8, b=8 * (k + 1)), "input_ids")
        if grown_ids is not None:
            tp.drop(grown_ids)
        grown_ids = cat
        # unfinished_sequences & ~stopping_criteria(...): max length and EOS criteria, B flags each
        f1, f2 = tp.raw(Sz(b=1), "full"), tp.raw(Sz(b=1), "full")
        o1 = tp.raw(Sz(b=1), "or")
        tp.drop(f2, f1)
        i1 = tp.raw(Sz(b=1), "isin")
        a1 = tp.raw(Sz(b=1), "any")
        tp.drop(i1)
        o2 = tp.raw(Sz(b=1), "or")
        tp.drop(a1, o1)
        n1 = tp.raw(Sz(b=1), "not")
        tp.drop(o2)
        still = tp.raw(Sz(b=8), "unfinished_sequences")
        tp.drop(n1, unfinished)
        unfinished = still
        temp(Sz(c=8), Sz(c=1))  # unfinished_sequences.max() == 0 (read on the host)
        tp.drop(logits)  # del outputs
    # generate returns: its locals and the cache go; the output ids are the caller's
    tp.drop(grown_positions, unfinished, *clones, logits32, scores, next_tokens, specials[0], positions, specials[1],
            mask)
    tp.kv.release()
    tp.kv = None
    return grown_ids
