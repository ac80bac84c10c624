"""Recipes: the forward of each module family, op by op, as transformers 5.x writes it.

A recipe receives symbolic tensors and calls the ops of `ops.py` in the order of the real code,
dropping references where the Python code does. It is replayed once per (model, plan options) and
cached; see `tape.py` for how sizes stay symbolic in batch and sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.engine.autograd import Backward, Node, SizeFn, formula
from planner.engine.ops import (E, M, SAVED_DETACH, V, Lora, Weight, alias, binary, cast, dropout, linear, lora_linear,
                                promote, unary)
from planner.engine.runtime import sdpa_backward_workspaces
from planner.engine.tape import DTYPE_BYTES, Tape, Tensor, Sym, fixed, tok


@dataclass(frozen=True)
class LayerCfg:
    """Everything a decoder-layer recipe needs, resolved from the model and the plan."""

    family: str  # "llama" (llama, mistral, qwen2, mixtral, phi3), "gemma2", "gpt2", "opt"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool
    weights: dict[str, Weight]  # module name -> weight (names as in ModelSpec.layer_linears)
    loras: dict[str, Lora] = field(default_factory=dict)
    autocast: str | None = None  # autocast dtype, None when off
    attn: str = "sdpa"
    norm_dtype: str = "bf16"  # dtype of norm weights
    norm_trainable: bool = True
    experts: int = 0
    experts_per_token: int = 0
    act: str = "silu"
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    training: bool = True
    # micro-batches of one sequence: some reshapes of a one-row tensor are views where several rows
    # need a copy (eager attention's q)
    one_sequence: bool = False
    # generate()'s forwards: K and V are the DynamicCache's tensors (torch.cat's contiguous output);
    # `one_query`: a decode step's (one query position: eager's q and output reshape as views)
    kv_cached: bool = False
    one_query: bool = False


def _lin(tp: Tape, x: Tensor, cfg: LayerCfg, name: str) -> Tensor:
    return lora_linear(tp, x, cfg.weights[name], cfg.loras.get(name), cfg.autocast, name)


# ---- norms -----------------------------------------------------------------------------------
def rms_norm(tp: Tape, x: Tensor, cfg: LayerCfg, name: str) -> Tensor:
    """LlamaRMSNorm: x.to(fp32); x * rsqrt(x.pow(2).mean(-1) + eps); weight * x.to(input dtype).
    `variance` and the fp32 result stay referenced until the forward returns."""
    w = tp.param(fixed(cfg.hidden), cfg.norm_dtype, cfg.norm_trainable, f"{name}.weight")
    tp.module()
    xf = cast(tp, x, "fp32", f"{name}.fp32")
    p, var, r = _rms(tp, xf, name)
    y = binary(tp, xf, r, f"{name}.normalize", saves=True)
    tp.drop(xf, r)
    yc = cast(tp, y, x.dtype, f"{name}.to_input_dtype")
    out = binary(tp, w, yc, f"{name}.scale", saves=True)
    tp.drop(yc, y, var)
    return out


# x.pow(2) (backward: pow, mul, mul), .mean(-1, keepdim) (expand, div), + eps (no backward op),
# rsqrt (saves its output; backward: pow, mul, mul)
POW2_BWD = ("pow", "mul", "mul")
MEAN_BWD = ("view:expand", "div")
RSQRT_BWD = ("pow", "mul", "mul")


def _rms(tp: Tape, xf: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) of an fp32 tensor: (pow's output, the mean, r);
    the mean (`variance`) is still referenced by the caller. Backward temporaries: pow's
    self.pow(1) and its product by 2; rsqrt's result.pow(3) and its product by -0.5."""
    p = unary(tp, xf, f"{name}.pow", saves_input=True, aten="pow", bwd=POW2_BWD, temps=2)
    var = unary(tp, p, f"{name}.mean", elems=tok(1), aten="mean", bwd=MEAN_BWD)
    tp.drop(p)
    ve = unary(tp, var, f"{name}.add_eps", aten="add", grad="pass")
    r = unary(tp, ve, f"{name}.rsqrt", saves_output=True, aten="rsqrt", bwd=RSQRT_BWD, temps=2)
    tp.drop(ve)
    return p, var, r


def gemma_rms_norm(tp: Tape, x: Tensor, cfg: LayerCfg, name: str) -> Tensor:
    """Gemma2RMSNorm: (norm(x.float()) * (1 + w.float())).type_as(x)."""
    wf = tp.external(fixed(cfg.hidden), "fp32", cfg.norm_trainable)
    tp.module()
    xf = cast(tp, x, "fp32", f"{name}.fp32")
    p, var, r = _rms(tp, xf, name)
    tp.drop(var)
    y = binary(tp, xf, r, f"{name}.normalize", saves=True)
    tp.drop(xf, r)
    out = binary(tp, y, wf, f"{name}.scale", saves=True)
    tp.drop(y)
    res = cast(tp, out, x.dtype, f"{name}.type_as")
    tp.drop(out)
    return res


def layer_norm(tp: Tape, x: Tensor, cfg: LayerCfg, name: str) -> Tensor:
    """nn.LayerNorm (GPT-2, OPT): saves input, mean and rstd (fp32 per row); fp32 under CUDA autocast."""
    xin = cast(tp, x, "fp32", f"{name}.autocast_fp32") if cfg.autocast else alias(x)
    out = tp.new(xin.elems, xin.dtype, xin.rg or cfg.norm_trainable, name)
    stats = tp.new(tok(2), "fp32", False, f"{name}.mean_rstd")
    if out.rg:
        tp.save(xin, stats)
    tp.drop(stats, xin)
    return out


# ---- attention -------------------------------------------------------------------------------
def rotary(tp: Tape, q: Tensor, cos: Tensor, sin: Tensor, elems: int, name: str) -> Tensor:
    """apply_rotary_pos_emb for one of q/k: (q * cos) + (rotate_half(q) * sin)."""
    a = binary(tp, q, cos, f"{name}.mul_cos", saves=True)
    # rotate_half: cat(-x[..., d/2:], x[..., :d/2]): two slices (views of q, each sending q a gradient
    # through slice_backward), neg, cat (its backward: two slices of the gradient)
    tp.op(V, "slice", count=2)
    tp.use(q, q)
    x1 = tp.view(q, "slice", elems=tok(elems / 2), name=f"{name}.x1")
    x2 = tp.view(q, "slice", elems=tok(elems / 2), name=f"{name}.x2")
    neg = tp.out(tp.fn("elementwise", (x2,)), tp.new(tok(elems / 2), q.dtype, q.rg, f"{name}.neg_half"))
    tp.op(E, "neg", bytes=neg.size * 2, dtype=q.dtype)
    rh = tp.out(tp.fn("cat", (neg, x1)), tp.new(tok(elems), q.dtype, q.rg, f"{name}.rotate_half"))
    tp.drop(x1, x2)
    tp.op(E, "cat", bytes=rh.size * 2, dtype=q.dtype)
    if q.rg:
        tp.bop(V, "slice", count=2)
        tp.bop(E, "neg", bytes=neg.size * 2, dtype=q.dtype)
        tp.bop(E, "slice_backward", bytes=neg.size * 3, dtype=q.dtype, count=2)
    tp.drop(neg)
    b = binary(tp, rh, sin, f"{name}.mul_sin", saves=True)
    tp.drop(rh)
    out = binary(tp, a, b, f"{name}.add", saves=False)
    tp.drop(a, b)
    return out


def attention_core(tp: Tape, q: Tensor, k: Tensor, v: Tensor, cfg: LayerCfg, name: str,
                   held: list[Tensor] | None = None, mask_dtype: str | None = None) -> Tensor:
    """SDPA (flash/efficient kernel: q, k, v, out and an fp32 logsumexp saved; K/V stay at the KV-head
    count through enable_gqa) or transformers' eager attention (`eager_attention`: S x S scores, fp32
    softmax), returning the output contiguous in (B, S, heads, dim) order. `held`: where eager's
    attention weights go when the caller keeps them (LlamaDecoderLayer's `_`), else dropped here;
    `mask_dtype`: the dtype of the additive causal mask (the model's hidden states')."""
    nq = cfg.heads * cfg.head_dim
    if cfg.attn != "sdpa":
        out, weights = eager_attention(tp, q, k, v, cfg, name, mask_dtype or q.dtype)
        if held is None:
            tp.drop(weights)
        else:
            held.append(weights)
        return out
    if cfg.autocast:
        # autocast casts SDPA's arguments right to left (as F.linear's): v, k, then q
        v2, k2, q2 = (cast(tp, t, cfg.autocast, f"{name}.autocast_{n}") for t, n in ((v, "v"), (k, "k"), (q, "q")))
    else:
        q2, k2, v2 = alias(q), alias(k), alias(v)
    # the kernel's node saves q, k, v (before it runs), its output and logsumexp (after)
    node = tp.fn("sdpa", (q2, k2, v2), (q2, k2, v2), heads=cfg.heads, kv_heads=cfg.kv_heads,
                 head_dim=cfg.head_dim)
    out = tp.out(node, tp.new(tok(nq), q2.dtype, True, f"{name}.sdpa_out"), saved=True)
    lse = tp.out(node, tp.new(tok(cfg.heads), "fp32", False, f"{name}.logsumexp"), saved=True)
    sdpa_ops(tp, q2, k2, v2, out, cfg)
    if q2.rg or k2.rg or v2.rg:
        tp.save(q2, k2, v2, out, lse)
    tp.drop(lse, q2, k2, v2)
    # the kernel allocates its output as (B, S, heads, dim): transpose(1, 2).contiguous() is free
    return out


def _repeat_kv(tp: Tape, t: Tensor, cfg: LayerCfg, name: str) -> Tensor:
    """transformers' repeat_kv: `t[:, :, None].expand(B, kv, n_rep, S, D).reshape(B, heads, S, D)`, a
    copy (clone + _unsafe_view) where the groups have more than one head; its backward sums the
    gradient over the copies (sum.dim_IntList at the KV heads' size) and squeezes it."""
    if cfg.heads == cfg.kv_heads:
        return alias(t)
    nq = cfg.heads * cfg.head_dim
    tp.op(V, "unsqueeze")
    tp.op(V, "expand")
    u = tp.view(t, "view")
    x = tp.view(u, "elementwise", elems=tok(nq))  # ExpandBackward0: sum_to the KV heads
    rep = tp.out(tp.fn("pass", (x,)), tp.new(tok(nq), t.dtype, t.rg, name))
    tp.op(E, "clone", bytes=rep.size * 2, dtype=t.dtype)
    tp.op(V, "_unsafe_view")
    tp.reshape(rep)
    tp.use(t)
    tp.drop(u, x)
    if t.rg:
        tp.bop(V, "view")
        tp.bop(E, "sum", bytes=rep.size + t.size, dtype=t.dtype)
        tp.bop(V, "squeeze")
    return rep


def _operand_3d(tp: Tape, x: Tensor, copies: bool, name: str) -> tuple[Tensor, Tensor]:
    """One operand of at::matmul's batched path: `x.expand(batch + mat).reshape(batch, *mat)`; the
    reshape copies (clone + _unsafe_view) where `copies` (the layout allows no view). Returns (the
    expanded view, the 3D operand)."""
    tp.op(V, "expand")
    xe = tp.view(x, "view")
    if copies:
        x3 = tp.out(tp.fn("pass", (xe,)), tp.new(x.elems, x.dtype, x.rg, name))
        tp.op(E, "clone", bytes=x.size * 2, dtype=x.dtype)
        tp.op(V, "_unsafe_view")
        tp.reshape(x3)
    else:
        x3 = tp.view(xe, "view")
        tp.op(V, "view")
    return xe, x3


def _batched_matmul(tp: Tape, a: Tensor, b: Tensor, b_base: Tensor, copies: tuple[bool, bool], out_elems: Sym,
                    cfg: LayerCfg, name: str, grad_copies: bool) -> Tensor:
    """torch.matmul of two 4D tensors as at::matmul runs it: each operand expanded to the batch and
    reshaped to 3D (`copies`: which ones' layouts allow no view, so clone + _unsafe_view), one bmm
    (saving both), its output viewed back to 4D (`grad_copies`: the gradient that comes back is not
    contiguous, so its reshape copies). BmmBackward0 makes the second operand's gradient first, then
    the first's (the dry run's trace). `b_base`: the tensor whose storage `b` views (what the bmm's
    saved operand keeps alive when its reshape is a view)."""
    a_copies, b_copies = copies
    ae, a3 = _operand_3d(tp, a, a_copies, f"{name}.a_3d")
    be, b3 = _operand_3d(tp, b, b_copies, f"{name}.b_3d")
    node = tp.fn("bmm", (a3, b3), (a3, b3))
    out = tp.out(node, tp.new(out_elems, a.dtype, a.rg or b.rg, name))
    tp.op(V, "_unsafe_view")
    tp.reshape(out, "view_copy" if grad_copies else "view")
    eager_matmul_ops(tp, a, b, out, cfg)
    tp.use(a3, b3)
    if out.rg:
        tp.save(a3 if a_copies else a, b3 if b_copies else b_base)
    tp.drop(ae, be, a3, b3)
    if out.rg:
        tp.bop(V, "transpose", count=2)  # mat2.transpose(1, 2) and self.transpose(1, 2)
        tp.bop(V, "view", count=2)  # the 3D operands' reshapes back
        # the output's: a view of a contiguous gradient, else a copy
        if grad_copies:
            tp.bop(E, "clone", bytes=out.size * 2, dtype=out.dtype)
            tp.bop(V, "_unsafe_view")
        else:
            tp.bop(V, "view")
    return out


def eager_attention(tp: Tape, q: Tensor, k: Tensor, v: Tensor, cfg: LayerCfg, name: str,
                    mask_dtype: str) -> tuple[Tensor, Tensor]:
    """transformers' eager_attention_forward (5.25): k and v repeated to every head (`_repeat_kv`),
    `torch.matmul(q, k.transpose(2, 3)) * scaling + mask`, `softmax(dim=-1, dtype=fp32)` (its input
    cast to fp32 first), `.to(q.dtype)`, dropout (none at p = 0), `torch.matmul(weights, v)`.
    Under autocast the matmuls cast their operands (right to left: the second first) and the fp32
    mask promotes the scores to fp32. Returns (the output made contiguous in (B, S, heads, D) order; the
    attention weights)."""
    nq = cfg.heads * cfg.head_dim
    kr = _repeat_kv(tp, k, cfg, f"{name}.repeat_k")
    vr = _repeat_kv(tp, v, cfg, f"{name}.repeat_v")
    tp.op(V, "transpose")
    kt = tp.view(kr, "view")
    if kr.rg:
        tp.bop(V, "transpose")
    ac = cfg.autocast
    kc = cast(tp, kt, ac, f"{name}.autocast_kT") if ac else alias(kt)
    qc = cast(tp, q, ac, f"{name}.autocast_q") if ac else alias(q)
    # q is a transposed view of its projection (B, S, heads, D): its 3D reshape copies, and so do k's
    # and v's without grouped heads (repeat_kv's copies are contiguous); the output's gradient arrives
    # transposed the same way. Views instead for one sequence ((1, heads, S, D) reshapes to (heads, S,
    # D)) and a decode step's (B, heads, 1, D); the cache's K and V are contiguous.
    many = not (cfg.one_sequence or cfg.one_query)
    plain = cfg.heads == cfg.kv_heads and not (cfg.one_sequence or cfg.kv_cached)
    scores = _batched_matmul(tp, qc, kc, kr if kc is kt else kc, (many, plain), Sym(q=cfg.heads), cfg,
                             f"{name}.scores", grad_copies=False)
    tp.drop(qc, kc, kt)
    scaled = unary(tp, scores, f"{name}.scale", aten="mul", bwd=("mul",))  # * scaling (a Python float)
    tp.drop(scores)
    masked = unary(tp, scaled, f"{name}.mask_add", dtype=promote(scaled.dtype, mask_dtype), aten="add",
                   grad="pass")
    if masked.dtype != scaled.dtype and scaled.rg:  # autograd casts the promoted gradient back
        tp.bop(E, "_to_copy", bytes=scaled.size + masked.size, dtype=scaled.dtype)
    tp.drop(scaled)
    s32 = cast(tp, masked, "fp32", f"{name}.softmax_fp32")
    probs32 = unary(tp, s32, f"{name}.softmax", saves_output=True, aten="_softmax", bwd=("_softmax_backward_data",))
    tp.drop(s32)
    probs = cast(tp, probs32, q.dtype, f"{name}.weights")
    tp.drop(masked, probs32)
    vc = cast(tp, vr, ac, f"{name}.autocast_v") if ac else alias(vr)
    pc = cast(tp, probs, ac, f"{name}.autocast_weights") if ac else alias(probs)
    out = _batched_matmul(tp, pc, vc, vc, (False, plain), tok(nq), cfg, f"{name}.attn_out", grad_copies=many)
    tp.drop(pc, vc)
    # attn_output.transpose(1, 2).contiguous(): a copy (its backward: a transpose of the gradient), none
    # for one query position ((B, 1, heads, D) is contiguous already)
    tp.op(V, "transpose")
    if out.rg:
        tp.bop(V, "transpose")
    if cfg.one_query:
        tp.drop(kr, vr)
        return out, probs
    outc = tp.out(tp.fn("pass", (out,)), tp.new(tok(nq), out.dtype, out.rg, f"{name}.transpose_contiguous"))
    tp.op(E, "clone", bytes=out.size * 2, dtype=out.dtype)
    tp.drop(out)
    # the function returns: key_states and value_states go
    tp.drop(kr, vr)
    return outc, probs


def eager_matmul_ops(tp: Tape, a: Tensor, b: Tensor, out: Tensor, cfg: LayerCfg) -> None:
    """One of eager attention's two batched matmuls (q k^T, probs v) and, where autograd records, its
    backward's two (one per operand): FLOPs 2 x heads x head_dim per (query, key) pair, all T x S pairs
    over the batch (eager computes the masked ones too)."""
    f = Sym(q=2 * cfg.heads * cfg.head_dim)
    io = a.size + b.size + out.size
    tp.op(M, "bmm", flops=f, bytes=io, dtype=out.dtype)
    tp.bop(M, "bmm", flops=f, bytes=io, dtype=out.dtype, count=2)


@formula("bmm")
def _bmm_backward(bw: Backward, n: Node, grads: list) -> list:
    """BmmBackward0: the second operand's gradient (self^T @ grad) first, then the first's
    (grad @ mat2^T), as the dry run's trace shows them."""
    g = grads[0]
    (a_el, _, a_edge), (b_el, _, b_edge) = n.inputs
    gb = bw.new(b_el, g.dtype) if (g is not None and b_edge is not None) else None
    ga = bw.new(a_el, g.dtype) if (g is not None and a_edge is not None) else None
    return [ga, gb]


SDPA_KERNEL = "_scaled_dot_product_flash_attention"
SDPA_BACKWARD_FLOPS = 2.5  # 5 matmuls to the forward's 2 (torch.utils.flop_counter's sdpa backward count)


def sdpa_ops(tp: Tape, q: Tensor, k: Tensor, v: Tensor, out: Tensor, cfg: LayerCfg) -> None:
    """F.scaled_dot_product_attention(is_causal=True, enable_gqa) as one flash kernel (which saves its
    output: detached once here, once in backward), and its backward kernel. FLOPs: 4 x heads x dim
    per computed (query, key) pair, T(S + 1)/2 causal pairs over the batch (planner.engine.compute)."""
    tp.saving(q, k, v)
    sdpa_kernel_ops(tp, q.size + k.size + v.size + out.size, q.dtype, q.rg or k.rg or v.rg, cfg)
    tp.use(q, k, v)


def sdpa_kernel_ops(tp: Tape, io: Sym, dtype: str, grad: bool, cfg: LayerCfg) -> None:
    """The ops of causal SDPA (what the time model prices; sdpa_ops): the flash kernel moving `io` bytes,
    and where its inputs require grad the output's detach (once here, once in backward) and the backward
    kernel. FLOPs: 4 x heads x dim per computed (query, key) pair, T(S + 1)/2 causal pairs."""
    hd = cfg.heads * cfg.head_dim
    f = Sym(t=2 * hd, q=2 * hd)
    # dims (head dim, 0): what a profile's attention_shapes price it by (0: S query rows, causal; a decode
    # step's is (head dim, 1), planner.engine.program._decode_attention), its key length the stretch's S
    dims = (cfg.head_dim, 0)
    tp.op("attention", SDPA_KERNEL, flops=f, bytes=io, dtype=dtype, dims=dims)
    if grad:
        tp.op(V, SAVED_DETACH)
        tp.bop(V, SAVED_DETACH)
        tp.bop("attention", SDPA_KERNEL + "_backward", flops=f * SDPA_BACKWARD_FLOPS, bytes=io * 2, dtype=dtype,
               dims=dims)


@formula("sdpa")
def _sdpa_backward(bw: Backward, n: Node, grads: list) -> list:
    """SDPA's backward kernel: gradients of q, k and v (k and v at the KV-head count through
    enable_gqa), then the blocks the kernel allocates and frees inside (planner.engine.runtime)."""
    g = grads[0]
    if g is None:
        return [None, None, None]
    out = [bw.new(el, dt) for el, dt, _ in n.inputs]
    m = n.meta
    for i in range(4):
        bw.workspace(SizeFn(_sdpa_workspace, (bw.rec.sdpa_backend, m["heads"], m["kv_heads"], m["head_dim"],
                                              DTYPE_BYTES[n.inputs[0][1]], i)))
    return out


def _sdpa_workspace(batch: int, seq: int, backend: str, heads: int, kv_heads: int, head_dim: int, elem: int,
                    i: int) -> int:
    sizes = sdpa_backward_workspaces(backend, batch, heads, kv_heads, seq, head_dim, elem)
    return sizes[i] if i < len(sizes) else 0


def _heads_view(tp: Tape, t: Tensor, contiguous_grad: bool) -> None:
    """`x.view(batch, seq, heads, dim).transpose(1, 2)` of a projection's output; its backward
    transposes back and reshapes: a view when the gradient's layout allows it (v), else clone +
    _unsafe_view (q, k), as seen in the dry run's recording of SDPA's backward."""
    tp.op(V, "view")
    tp.op(V, "transpose")
    # ViewBackward0's reshape of the transposed-back gradient: a view, or a copy when its layout
    # does not allow one; TransposeBackward0: a view
    tp.reshape(t, "view" if contiguous_grad else "view_copy")
    tp.reshape(t)
    if t.rg:
        tp.bop(V, "transpose")
        if contiguous_grad:
            tp.bop(V, "view")
        else:
            tp.bop(E, "clone", bytes=t.size * 2, dtype=t.dtype)
            tp.bop(V, "_unsafe_view")


def llama_attention(tp: Tape, x: Tensor, cos: Tensor, sin: Tensor, cfg: LayerCfg, held: list[Tensor] | None = None,
                    mask_dtype: str | None = None) -> Tensor:
    """LlamaAttention.forward: q/k/v projections, rotary, attention, o_proj. `held`: eager's attention
    weights, returned beside the output (the decoder layer keeps them as `_` until it returns);
    `mask_dtype`: the causal mask's dtype (the layer input's)."""
    nq = cfg.heads * cfg.head_dim
    nkv = cfg.kv_heads * cfg.head_dim
    if "qkv_proj" in cfg.weights:  # phi3: one fused projection, then split views
        qkv = _lin(tp, x, cfg, "qkv_proj")
        q, k, v = alias(qkv), alias(qkv), alias(qkv)
        tp.drop(qkv)
        # views of one tensor: rotary reads them, the fused buffer lives while any view is referenced
        qr = rotary(tp, _view(q, nq), cos, sin, nq, "q")
        kr = rotary(tp, _view(k, nkv), cos, sin, nkv, "k")
        tp.drop(q, k)
        out = attention_core(tp, qr, kr, v, cfg, "attn", held, mask_dtype)
    else:
        q = _lin(tp, x, cfg, "q_proj")
        _heads_view(tp, q, contiguous_grad=False)
        k = _lin(tp, x, cfg, "k_proj")
        _heads_view(tp, k, contiguous_grad=False)
        v = _lin(tp, x, cfg, "v_proj")
        # SDPA's backward kernel writes v's gradient in (B, S, heads, D) order; eager's arrives in
        # (B, heads, S, D) order, so its reshape copies
        _heads_view(tp, v, contiguous_grad=cfg.attn == "sdpa")
        tp.op(V, "unsqueeze", count=2)  # cos.unsqueeze(1), sin.unsqueeze(1)
        # query_states, key_states = apply_rotary_pos_emb(...): both rebound once both are computed
        qr = rotary(tp, q, cos, sin, nq, "q")
        kr = rotary(tp, k, cos, sin, nkv, "k")
        tp.drop(q, k)
        if tp.kv is not None:
            # key_states, value_states = cache.update(...): the cache's grown tensors from now on
            ck, cv = tp.kv.update(tp, kr, v)
            tp.drop(kr, v)
            kr, v = ck, cv
        out = attention_core(tp, qr, kr, v, cfg, "attn", held, mask_dtype)
    if cfg.attn == "sdpa":
        # attn_output.transpose(1, 2).contiguous().reshape(*input_shape, -1): views of the kernel's output
        # (SDPA's own reshape, the transpose, the reshape)
        tp.op(V, "view")
        tp.op(V, "transpose")
        tp.op(V, "view")
        for _ in range(3):
            tp.reshape(out)
        if out.rg:
            tp.bop(V, "view", count=3)
    else:  # eager made it contiguous: .reshape(*input_shape, -1) views it
        tp.op(V, "view")
        tp.reshape(out)
        if out.rg:
            tp.bop(V, "view")
    o = _lin(tp, out, cfg, "o_proj")
    # the forward's locals go when it returns: q, k, v and the attention output
    tp.drop(out, qr, kr, v)
    tp.module()  # the attention module
    return o


def _view(t: Tensor, elems: int) -> Tensor:
    """A view of part of a fused tensor: same storage, so reading it allocates nothing."""
    return Tensor(tok(elems), t.dtype, t.rg, t.name + ".view", external=True)


# ---- MLP -------------------------------------------------------------------------------------
def gated_mlp(tp: Tape, x: Tensor, cfg: LayerCfg) -> Tensor:
    """down(act(gate(x)) * up(x)); phi3 fuses gate and up into gate_up_proj and chunks it."""
    if "gate_up_proj" in cfg.weights:
        gu = _lin(tp, x, cfg, "gate_up_proj")
        g = _view(gu, cfg.intermediate)
        u = _view(gu, cfg.intermediate)
        a = unary(tp, g, "act", saves_input=False)
        if a.rg:
            tp.save(gu)  # the activation saves its input: a view keeping the fused output alive
        m = binary(tp, a, u, "gate_mul_up", saves=True)
        if a.rg:
            tp.save(gu)
        tp.drop(gu, a)
    else:
        g = _lin(tp, x, cfg, "gate_proj")
        a = activation(tp, g, cfg)
        tp.drop(g)
        u = _lin(tp, x, cfg, "up_proj")
        m = binary(tp, a, u, "gate_mul_up", saves=True)
        tp.drop(a, u)
    d = _lin(tp, m, cfg, "down_proj")
    tp.drop(m)
    tp.module()  # the MLP module
    return d


def moe_mlp(tp: Tape, x: Tensor, cfg: LayerCfg) -> Tensor:
    """Mixtral's sparse MoE block: router (linear, fp32 softmax, top-k), then each token through k
    experts (gather, gate_up matmul, act * up, down matmul, weighted sum back). Expert weights are
    fused 3-D parameters (never LoRA targets nor quantized). Sizes are summed over experts: the k
    routed copies of every token, whichever expert they land on."""
    k = cfg.experts_per_token
    h, inter = cfg.hidden, cfg.intermediate
    router_w = Weight(h, cfg.experts, cfg.norm_dtype, cfg.norm_trainable)
    logits = linear(tp, x, router_w, cfg.autocast, "router")
    l32 = cast(tp, logits, "fp32", "router.float")
    tp.drop(logits)
    probs = unary(tp, l32, "router.softmax", saves_output=True)
    tp.drop(l32)
    top = unary(tp, probs, "router.topk", elems=tok(k))
    idx = tp.new(tok(k), "int64", False, "router.topk_index")
    tp.drop(probs)
    weights = unary(tp, top, "router.renormalize", saves_input=True)
    tp.drop(top)
    final = tp.new(tok(h), x.dtype, True, "moe.final")
    expert_w = cfg.norm_trainable
    cd = cfg.autocast or x.dtype
    cur = tp.new(tok(k * h), cd, x.rg, "moe.gather")
    gu = tp.new(tok(k * 2 * inter), cd, x.rg or expert_w, "moe.gate_up")
    # MixtralExperts loops over the experts: per expert, the routed tokens' gate_up and down matmuls
    # (each token's k copies over all experts: 2 k h 2I + 2 k I h FLOPs per token), their backward
    # (the input's gradient, and the fused expert weights' when they are trained)
    E_ = cfg.experts
    wb = DTYPE_BYTES[cd]
    for f_tok, w_elems in ((2 * k * h * 2 * inter, 2 * inter * h), (2 * k * inter * h, inter * h)):
        fl = Sym(t=f_tok / E_)
        by = Sym(c=w_elems * wb, t=f_tok / E_ / max(inter, 1) * wb)
        tp.op(M, "mm", flops=fl, bytes=by, dtype=cd, count=E_)
        if x.rg or expert_w:
            tp.bop(M, "mm", flops=fl, bytes=by, dtype=cd, count=E_ * (2 if expert_w and x.rg else 1))
    if expert_w:
        tp.save(cur)
    act = unary(tp, _view(gu, k * inter), "moe.act")
    if gu.rg:
        tp.save(gu)
    prod = tp.new(tok(k * inter), cd, gu.rg, "moe.act_mul_up")
    if gu.rg:
        tp.save(act)
    tp.drop(act, gu)
    down = tp.new(tok(k * h), cd, prod.rg, "moe.down")
    if prod.rg and expert_w:
        tp.save(prod)
    tp.drop(prod)
    weighted = binary(tp, down, weights, "moe.weighted", saves=True)
    tp.drop(down, cur, weights, idx)
    tp.drop(weighted)
    return final


def plain_mlp(tp: Tape, x: Tensor, cfg: LayerCfg, up: str, down: str, release_input: bool) -> Tensor:
    """down(act(up(x))): GPT-2's c_fc/c_proj, OPT's fc1/fc2. `release_input`: the code rebinds the
    variable holding `x` right after `up` (OPT); otherwise the caller holds it until the MLP returns
    (GPT-2's block) and drops it itself."""
    h = _lin(tp, x, cfg, up)
    if release_input:
        tp.drop(x)
    a = activation(tp, h, cfg)
    tp.drop(h)
    d = _lin(tp, a, cfg, down)
    tp.drop(a)
    return d


def dropout_residual(tp: Tape, y: Tensor, residual: Tensor, cfg: LayerCfg, name: str) -> Tensor:
    """residual + dropout(y), both inputs released (GPT-2 and OPT blocks)."""
    yd = dropout(tp, y, cfg.resid_dropout, cfg.training, f"{name}.dropout")
    tp.drop(y)
    out = binary(tp, residual, yd, name, saves=False)
    tp.drop(residual, yd)
    return out


# ---- decoder layers --------------------------------------------------------------------------
def llama_layer(tp: Tape, x: Tensor, cos: Tensor, sin: Tensor, cfg: LayerCfg) -> Tensor:
    """LlamaDecoderLayer (also Mistral, Qwen2, Phi-3): pre-norm attention and MLP with residuals."""
    tp.module()
    held: list[Tensor] = []  # `hidden_states, _ = self.self_attn(...)`: eager's weights, until the layer returns
    h = rms_norm(tp, x, cfg, "input_layernorm")
    a = llama_attention(tp, h, cos, sin, cfg, held, x.dtype)
    tp.drop(h)
    r1 = binary(tp, x, a, "residual_attn", saves=False)
    tp.drop(x, a)
    h2 = rms_norm(tp, r1, cfg, "post_attention_layernorm")
    m = moe_mlp(tp, h2, cfg) if cfg.experts else gated_mlp(tp, h2, cfg)
    tp.drop(h2)
    out = binary(tp, r1, m, "residual_mlp", saves=False)
    tp.drop(r1, m, *held)
    return out


def gemma2_layer(tp: Tape, x: Tensor, cos: Tensor, sin: Tensor, cfg: LayerCfg) -> Tensor:
    h = gemma_rms_norm(tp, x, cfg, "input_layernorm")
    a = llama_attention(tp, h, cos, sin, cfg)
    tp.drop(h)
    an = gemma_rms_norm(tp, a, cfg, "post_attention_layernorm")
    tp.drop(a)
    r1 = binary(tp, x, an, "residual_attn", saves=False)
    tp.drop(x, an)
    h2 = gemma_rms_norm(tp, r1, cfg, "pre_feedforward_layernorm")
    m = gated_mlp(tp, h2, cfg)
    tp.drop(h2)
    mn = gemma_rms_norm(tp, m, cfg, "post_feedforward_layernorm")
    tp.drop(m)
    out = binary(tp, r1, mn, "residual_mlp", saves=False)
    tp.drop(r1, mn)
    return out


def new_gelu(tp: Tape, x: Tensor) -> Tensor:
    """transformers' NewGELUActivation (GPT-2's gelu_new), written in Python:
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))); every op allocates, mul/tanh/pow save."""
    p3 = unary(tp, x, "gelu.pow3", saves_input=True)
    c = unary(tp, p3, "gelu.mul_const")
    tp.drop(p3)
    s1 = binary(tp, x, c, "gelu.add", saves=False)
    tp.drop(c)
    s2 = unary(tp, s1, "gelu.mul_sqrt")
    tp.drop(s1)
    t = unary(tp, s2, "gelu.tanh", saves_output=True)
    tp.drop(s2)
    one = unary(tp, t, "gelu.one_plus")
    tp.drop(t)
    half = unary(tp, x, "gelu.half_x")
    out = binary(tp, half, one, "gelu.mul", saves=True)
    tp.drop(half, one)
    return out


def activation(tp: Tape, x: Tensor, cfg: LayerCfg) -> Tensor:
    if cfg.act == "gelu_new":
        return new_gelu(tp, x)
    tp.module()  # the activation module (act_fn)
    if cfg.act == "relu":  # relu's backward reads its output
        return unary(tp, x, "act.relu", saves_output=True, aten="relu", bwd=("threshold_backward",))
    aten, bwd = ACTIVATION_OPS.get(cfg.act, ("gelu", "gelu_backward"))
    return unary(tp, x, f"act.{cfg.act}", saves_input=True, aten=aten, bwd=(bwd,))  # silu, gelu, gelu_pytorch_tanh


ACTIVATION_OPS = {"silu": ("silu", "silu_backward"), "gelu": ("gelu", "gelu_backward"),
                  "gelu_pytorch_tanh": ("gelu", "gelu_backward")}


def fused_qkv_attention(tp: Tape, qkv: Tensor, cfg: LayerCfg) -> Tensor:
    """Attention over q, k, v that are views of one fused projection output (GPT-2's c_attn)."""
    nq = cfg.heads * cfg.head_dim
    if cfg.attn == "sdpa":
        out = tp.new(tok(nq), qkv.dtype, True, "attn.sdpa_out")
        lse = tp.new(tok(cfg.heads), "fp32", False, "attn.logsumexp")
        # its kernels read q, k and v (the fused projection's output) and write the output
        sdpa_kernel_ops(tp, qkv.size + out.size, qkv.dtype, qkv.rg, cfg)
        if qkv.rg:
            tp.save(qkv, out, lse)
        tp.drop(lse)
        return out
    q = Tensor(tok(nq), qkv.dtype, qkv.rg, "q", external=True)
    out = attention_core(tp, q, q, q, cfg, "attn")
    if qkv.rg:
        tp.save(qkv)
    return out


def gpt2_layer(tp: Tape, x: Tensor, cos: Tensor, sin: Tensor, cfg: LayerCfg) -> Tensor:
    """GPT2Block: ln_1, c_attn (Conv1D = addmm), SDPA, c_proj, dropout, residual; ln_2, MLP."""
    h = layer_norm(tp, x, cfg, "ln_1")
    qkv = _lin(tp, h, cfg, "c_attn")
    tp.drop(h)
    a = fused_qkv_attention(tp, qkv, cfg)
    tp.drop(qkv)
    o = _lin(tp, a, cfg, "attn.c_proj")
    tp.drop(a)
    r1 = dropout_residual(tp, o, x, cfg, "residual_attn")
    h2 = layer_norm(tp, r1, cfg, "ln_2")
    m = plain_mlp(tp, h2, cfg, "c_fc", "mlp.c_proj", release_input=False)
    tp.drop(h2)
    return dropout_residual(tp, m, r1, cfg, "residual_mlp")


def opt_layer(tp: Tape, x: Tensor, cos: Tensor, sin: Tensor, cfg: LayerCfg) -> Tensor:
    """OPTDecoderLayer (layer norm before attention): q scaled after q_proj, out_proj, dropout, fc1/relu/fc2."""
    h = layer_norm(tp, x, cfg, "self_attn_layer_norm")
    q0 = _lin(tp, h, cfg, "q_proj")
    q = unary(tp, q0, "q_scale")
    tp.drop(q0)
    k = _lin(tp, h, cfg, "k_proj")
    v = _lin(tp, h, cfg, "v_proj")
    tp.drop(h)
    a = attention_core(tp, q, k, v, cfg, "attn")
    tp.drop(q, k, v)
    o = _lin(tp, a, cfg, "out_proj")
    tp.drop(a)
    r1 = dropout_residual(tp, o, x, cfg, "residual_attn")
    h2 = layer_norm(tp, r1, cfg, "final_layer_norm")
    m = plain_mlp(tp, h2, cfg, "fc1", "fc2", release_input=True)
    return dropout_residual(tp, m, r1, cfg, "residual_mlp")


LAYERS = {"llama": llama_layer, "gemma2": gemma2_layer, "gpt2": gpt2_layer, "opt": opt_layer}
