"""Operations as PyTorch runs them on CUDA, for the symbolic tape.

Each function allocates the outputs the real op allocates and saves for backward what autograd
saves: an input is saved only when the gradient that needs it is computed (PyTorch's codegen guards
saved variables with `should_compute_output`). Autocast follows CUDA's policy: matmuls run in the
autocast dtype (a cast copy of an input in another dtype is made; the cast of a weight that is a leaf
requiring grad is cached for the forward and saved for backward), norms, softmax and pow run in fp32,
elementwise ops follow type promotion. Callers drop what the Python program stops referencing.

Each function also lists the aten ops it dispatches (`tp.op`) and those autograd runs for its
backward (`tp.bop`), as the dry run's recorder sees them (planner.backends.dryrun.ops): kinds, FLOPs,
bytes read + written. The backward templates follow torch's derivatives (tools/autograd/
derivatives.yaml): mul's gradient is a mul per operand that needs one (plus sum + view back to a
broadcast parameter's shape), a dtype promotion adds a _to_copy back, a tensor used k times gets
k - 1 adds (Tape.backward_ops), a leaf parameter's AccumulateGrad is a `detach`, an op that saves
its output detaches it once in the forward and once when backward unpacks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.engine.autograd import Backward, Node, Sz, formula
from planner.engine.resident import QUANT_BLOCK
from planner.engine.tape import DTYPE_BYTES, ZERO, Sym, Tape, Tensor, fixed, tok

E, V, M = "elementwise", "view", "matmul"
SAVED_DETACH = "detach.saved"  # aten.detach of a saved output (the recorder's name: detach)
# a parameter's AccumulateGrad storing its first gradient as .grad: aten.detach (the recorder's name);
# `bytes` carries the parameter's gradient bytes, which a later micro-batch adds into .grad in place
# instead (planner.engine.program.accumulated). A view: priced by its count, its bytes are not read
ACCUMULATE_GRAD = "detach.accumulate_grad"


@dataclass(frozen=True, slots=True)
class Weight:
    """One linear layer's weight as the program holds it."""

    in_features: int
    out_features: int
    dtype: str  # storage dtype of a dense weight; "nf4"/"fp4" for bitsandbytes Linear4bit
    trainable: bool
    bias: bool = False
    nested: bool = False  # Linear4bit with double quantization (its absmax quantized in turn)

    @property
    def quantized(self) -> bool:
        return self.dtype in ("nf4", "fp4")


def promote(a: str, b: str) -> str:
    return a if DTYPE_BYTES[a] >= DTYPE_BYTES[b] else b


def alias(x: Tensor) -> Tensor:
    x.refs += 1
    return x


def cast(tp: Tape, x: Tensor, dtype: str, name: str) -> Tensor:
    """`x.to(dtype)`: the same tensor when the dtype already matches (no op dispatched), else a copy
    (_to_copy; its backward casts the gradient back); saves nothing."""
    if x.dtype == dtype:
        return alias(x)
    node = tp.fn("to_copy", (x,))  # ToCopyBackward0: the gradient cast back (saves nothing)
    out = tp.out(node, tp.new(x.elems, dtype, x.rg, name))
    tp.op(E, "_to_copy", bytes=x.size + out.size, dtype=dtype)
    tp.use(x)
    if x.rg:
        tp.bop(E, "_to_copy", bytes=x.size + out.size, dtype=x.dtype)
    return out


def _is_param(t: Tensor) -> bool:
    """A parameter operand: external and independent of the tokens."""
    return t.external and t.elems.t == 0 and t.elems.q == 0


def _grad_of(tp: Tape, x: Tensor, out: Tensor, mul: bool) -> None:
    """Backward ops of one operand `x` of an elementwise op producing `out`."""
    if not x.rg:
        return
    if mul:
        tp.bop(E, "mul", bytes=out.size * 2 + x.size, dtype=out.dtype)
    if x.elems != out.elems:  # broadcast: summed back to the operand's shape
        tp.bop(E, "sum", bytes=out.size + x.size, dtype=out.dtype)
        if _is_param(x):
            tp.bop(V, "view")
    if x.dtype != out.dtype:  # type promotion: the gradient cast back
        tp.bop(E, "_to_copy", bytes=x.size * 3, dtype=x.dtype)
    if _is_param(x):
        tp.bop(V, ACCUMULATE_GRAD, bytes=x.size, dtype=x.dtype)


def binary(tp: Tape, a: Tensor, b: Tensor, name: str, saves: bool, aten: str | None = None) -> Tensor:
    """Elementwise a (op) b with broadcasting: the output has the larger operand's elements.

    `saves`: mul-like (each operand is saved when the other's gradient is needed; the gradient of
    each is a mul) or add-like (gradients pass through). `aten`: the op's name (mul / add)."""
    dtype = promote(a.dtype, b.dtype)
    big = a if a.elems.t >= b.elems.t else b
    # MulBackward0 saves each operand the other's gradient needs; AddBackward0 nothing; SubBackward0
    # negates the subtrahend's gradient
    kind = "mul" if saves else ("sub" if aten == "sub" else "pass")
    node = tp.fn(kind, (a, b), saved=([b] if saves and a.rg else []) + ([a] if saves and b.rg else []))
    out = tp.out(node, tp.new(big.elems, dtype, a.rg or b.rg, name))
    if saves:
        tp.saving(*([b] if a.rg else []), *([a] if b.rg else []))
    tp.op(E, aten or ("mul" if saves else "add"), bytes=a.size + b.size + out.size, dtype=dtype)
    tp.use(a, b)
    if saves:
        if a.rg:
            tp.save(b)
        if b.rg:
            tp.save(a)
    for x in (a, b):
        _grad_of(tp, x, out, saves)
    if aten == "sub" and b.rg:  # the subtrahend's gradient is negated
        tp.bop(E, "neg", bytes=out.size * 2, dtype=out.dtype)
    return out


def unary(tp: Tape, x: Tensor, name: str, saves_input: bool = False, saves_output: bool = False,
          dtype: str | None = None, elems: Sym | None = None, aten: str = "", bwd: tuple[str, ...] = (),
          grad: str = "elementwise", temps: int = 0) -> Tensor:
    """An op of one tensor input. `aten`: its name (the op is listed only when named); `bwd`: the
    elementwise ops of its backward (views as 'view:NAME'). For the allocation recorder: `grad` names
    its backward formula (planner.engine.autograd.BACKWARD; default one new tensor like the input),
    `temps` the temporaries that formula makes first (pow's self.pow(e - 1) and its product by e)."""
    node = tp.fn(grad, (x,), saved=(x,) if saves_input else (), temps=temps)
    out = tp.out(node, tp.new(elems if elems is not None else x.elems, dtype or x.dtype, x.rg, name), saved=saves_output)
    if x.rg and saves_input:
        tp.save(x)
    if x.rg and saves_output:
        tp.save(out)
    if aten:
        if x.rg and (saves_input or saves_output):
            tp.saving(x)
        tp.op(E, aten, bytes=x.size + out.size, dtype=out.dtype)
        tp.use(x)
        if saves_output and x.rg:
            # the saved output, detached once here and once when backward unpacks it (not under a
            # checkpoint's saved-tensor hooks: planner.engine.program drops them there)
            tp.op(V, SAVED_DETACH)
            tp.bop(V, SAVED_DETACH)
        if x.rg:
            for b in bwd:
                if b.startswith("view:"):
                    tp.bop(V, b[5:])
                else:
                    tp.bop(E, b, bytes=x.size * 2 + out.size, dtype=x.dtype)
    return out


def dropout(tp: Tape, x: Tensor, p: float, training: bool, name: str) -> Tensor:
    """F.dropout: the input itself when p == 0 or in eval (ATen returns it); else CUDA's
    native_dropout, which returns the output and a bool mask that backward keeps."""
    if p == 0 or not training:
        return alias(x)
    out = tp.new(x.elems, x.dtype, x.rg, name)
    mask = tp.new(x.elems, "bool", False, f"{name}.mask")
    tp.op(E, "native_dropout", bytes=x.size + out.size + mask.size, dtype=x.dtype)
    tp.use(x)
    if x.rg:
        tp.save(mask)
        tp.bop(E, "native_dropout_backward", bytes=x.size * 2 + mask.size, dtype=x.dtype)
    tp.drop(mask)
    return out


def matmul_ops(tp: Tape, x: Tensor, w_bytes: Sym, in_f: int, out_f: int, dtype: str, x_rg: bool, w_rg: bool,
               bias: bool, out: Tensor) -> None:
    """F.linear on a (batch, seq, in) input as ATen dispatches it: t, view, mm (addmm with a bias),
    _unsafe_view; its backward: grad_x = grad @ W (view, t, mm, view), grad_W = grad^T @ x (view, t,
    mm, t, then AccumulateGrad's detach), grad_b = grad.sum(0) (sum, view, detach)."""
    f = Sym(t=2 * in_f * out_f)
    io = x.size + out.size
    tp.op(V, "t")
    tp.op(V, "view")
    if x_rg or w_rg:  # mm saves the input (for grad_W) and the weight (for grad_x)
        tp.saving(out)
    dims = (in_f, out_f)
    tp.op(M, "addmm" if bias else "mm", flops=f, bytes=io + w_bytes, dtype=dtype, layout="linear", dims=dims)
    tp.op(V, "_unsafe_view")
    if not (x_rg or w_rg):
        return
    tp.bop(V, "view")
    if w_rg:
        tp.bop(V, "t")
        tp.bop(M, "mm", flops=f, bytes=io + w_bytes, dtype=dtype, layout="grad_weight", dims=dims)
        tp.bop(V, "t")
    if x_rg:
        tp.bop(V, "t")
        tp.bop(M, "mm", flops=f, bytes=io + w_bytes, dtype=dtype, layout="grad_input", dims=dims)
        tp.bop(V, "view")
    if w_rg:
        tp.bop(V, "t")  # t's backward: the weight's gradient back to its layout
        tp.bop(V, ACCUMULATE_GRAD, bytes=w_bytes, dtype=dtype)
    if bias and w_rg:
        tp.bop(E, "sum", bytes=out.size, dtype=dtype)
        tp.bop(V, "view")
        tp.bop(V, ACCUMULATE_GRAD, bytes=Sym(c=out_f * DTYPE_BYTES[dtype]), dtype=dtype)


def linear(tp: Tape, x: Tensor, w: Weight, autocast: str | None, name: str, weight_key: str | None = None) -> Tensor:
    """nn.Linear (dense) or bitsandbytes Linear4bit; the caller still owns (and drops) `x`.
    `weight_key`: the weight's name when it is another module's (a tied output embedding)."""
    if w.quantized:
        return linear4bit(tp, x, w, name)
    compute = autocast or x.dtype
    n_w = fixed(w.in_features * w.out_features)
    weight = tp.param(n_w, w.dtype, w.trainable, f"{name}.weight", key=weight_key)
    bias = tp.param(fixed(w.out_features), w.dtype, w.trainable, f"{name}.bias") if w.bias else None
    wt = weight
    if autocast and w.dtype != compute:
        # Autocast casts F.linear's arguments to the compute dtype right to left (the C++ wrapper's
        # argument evaluation order): the bias, the weight, then the input. A trainable leaf's cast is
        # cached for the whole forward and saved for backward, a frozen one is made per call.
        if bias is not None and tp.rec is not None:
            bias = autocast_cast(tp, bias, compute, f"{name}.bias_cast", w.trainable)
        wt = autocast_cast(tp, weight, compute, f"{name}.weight_cast", w.trainable)
        if w.trainable:
            tp.autocast_cached = tp.autocast_cached + wt.size
    xin = cast(tp, x, compute, f"{name}.input_cast") if autocast else alias(x)
    out = linear_graph(tp, xin, wt, bias, tok(w.out_features), compute, name)
    tp.module()
    if autocast and w.dtype != compute:
        tp.op(E, "_to_copy", bytes=Sym(c=w.in_features * w.out_features * (DTYPE_BYTES[w.dtype] + DTYPE_BYTES[compute])),
              dtype=compute)
        if w.trainable:
            tp.bop(E, "_to_copy", bytes=wt.size * 3, dtype=w.dtype)
    tp.use(xin)
    matmul_ops(tp, xin, wt.size, w.in_features, w.out_features, compute, xin.rg, w.trainable, w.bias, out)
    if w.trainable:
        tp.save(xin)
    if x.rg:
        tp.save(wt)
    tp.drop(xin, wt)
    if bias is not None:
        tp.drop(bias)
    return out


def autocast_cast(tp: Tape, p: Tensor, dtype: str, name: str, trainable: bool) -> Tensor:
    """Autocast's cast of a parameter to its compute dtype (`cached_cast`): a leaf that requires grad
    (`trainable`, whether grad mode is on or not) is cast once per autocast region and the cast kept
    in autocast's cache until the region ends (the recorder holds it: planner.engine.autograd.
    Recorder.exit_autocast); a frozen one per call."""
    rec = tp.rec
    cached = rec is not None and trainable and p.key is not None
    if cached:
        hit = rec.autocast_cache.get(p.key)
        if hit is not None:  # a later forward in the region (two forwards per pair): the cached cast
            if hit.refs == 0:  # its earlier holders are gone: the cache's reference is the storage's last
                rec.ref(hit.st)
            return alias(hit)
    node = tp.fn("to_copy", (p,))
    out = tp.out(node, tp.new(p.elems, dtype, p.rg, name))
    if cached:
        rec.ref(out.st)
        rec.autocast_cache[p.key] = out
    return out


def linear_graph(tp: Tape, x: Tensor, w: Tensor, bias: Tensor | None, out_elems: Sym, dtype: str, name: str) -> Tensor:
    """F.linear's allocations and autograd nodes: without a bias `matmul(x, w.t())` (t, x.view(-1,
    in), mm, _unsafe_view), with one `_flatten_nd_linear` (x.view(-1, in), t, addmm, view). MmBackward0
    saves the input when the weight needs its gradient and the weight when the input does."""
    if bias is None:
        wT = tp.view(w, name=f"{name}.weight.t")
        x2 = tp.view(x, name=f"{name}.input_2d")
    else:
        x2 = tp.view(x, name=f"{name}.input_2d")
        wT = tp.view(w, name=f"{name}.weight.t")
    saved = ([x2] if wT.rg else []) + ([wT] if x2.rg else [])
    node = tp.fn("mm", (x2, wT), saved) if bias is None else tp.fn("addmm", (bias, x2, wT), saved)
    rg = x.rg or w.rg or (bias is not None and bias.rg)
    out = tp.out(node, tp.new(out_elems, dtype, rg, name))
    if tp.rec is not None:
        tp.rec.matmul()
    tp.reshape(out)
    tp.drop(x2, wT)
    return out


def linear4bit(tp: Tape, x: Tensor, w: Weight, name: str, compute: str = "bf16") -> Tensor:
    """bnb.nn.Linear4bit.forward: x.to(compute_dtype) -> matmul_4bit -> .to(input dtype).

    The 4-bit matmul dequantizes the whole weight to the compute dtype (a transient of out x in
    elements) and saves no activation for backward (it dequantizes again there).
    """
    xin = cast(tp, x, compute, f"{name}.input_cast")
    n = w.in_features * w.out_features
    blocks = -(-n // QUANT_BLOCK)
    if w.bias and tp.rec is not None:
        _bias_to_compute(tp, w, name, compute)
    # gemm_4bit's CUDA fallback (planner.backends.dryrun._patches.cuda_gemm_4bit): with double
    # quantization the dequantized absmax (empty_like) and `absmax + offset`, then the [N, K] weight.
    # Its fused kernel (the output alone) for a decode step's rows, one per sequence: bitsandbytes takes
    # it for up to _GEMM_4BIT_CUSTOM_FLOOR_M = 4 rows on every card (the trace's limits refuse more)
    # where the inner dimension is a multiple of the blocksize (backends/cuda/ops.py's gemm_4bit)
    fused = tp.rec is not None and tp.rec.per_sequence and w.in_features % QUANT_BLOCK == 0
    absmax = [tp.raw(Sz(c=blocks * 4), f"{name}.absmax_dq", "fp32") for _ in range(2 if w.nested and not fused else 0)]
    deq = tp.new(fixed(n), compute, False, f"{name}.dequant") if not fused else None
    # MatMul4Bit (a custom Function): saves no activation (its backward dequantizes again)
    node = tp.fn("matmul4bit", (xin,), nested=w.nested, blocks=blocks, n=n, dtype=compute)
    out = tp.out(node, tp.new(tok(w.out_features), compute, x.rg, name))
    if tp.rec is not None:
        tp.rec.matmul()
    tp.module()
    linear4bit_ops(tp, xin, w, compute, out)
    if deq is not None:
        tp.drop(deq)
    tp.drop(*absmax)
    res = cast(tp, out, x.dtype, f"{name}.output_cast")
    # `x` (rebound to its cast) goes when the forward returns
    tp.drop(out, xin)
    return res


def _bias_to_compute(tp: Tape, w: Weight, name: str, compute: str) -> None:
    """Linear4bit.forward's `bias.data = bias.data.to(x.dtype)`: at the first forward the frozen bias
    (fp32 after kbit preparation) is replaced by its cast for good (the parameter's old storage goes;
    planner.engine.autograd.Recorder.storages)."""
    rec = tp.rec
    key = f"{tp.scope}.{name}.bias" if tp.scope else f"{name}.bias"
    st = rec.storages.get(key)
    cast_size = Sz(c=w.out_features * DTYPE_BYTES[compute])
    if st is not None and st.size != cast_size:
        rec.storages[key] = rec.alloc(cast_size)
        rec.unref(st)


def linear4bit_ops(tp: Tape, x: Tensor, w: Weight, compute: str, out: Tensor) -> None:
    """bitsandbytes 0.50's MatMul4Bit on CUDA, as its kernels run (not as the dry run's allocation-
    faithful stand-in records them): the packed weight viewed [(N*K+1)/2, 1], then
    `bitsandbytes::gemm_4bit`, whose CUDA dispatch dequantizes the whole weight to the compute dtype
    (dequantize_4bit: 0.5 B read, 2 B written per element) and runs F.linear on it (t, mm,
    _unsafe_view); the backward dequantizes again (and, with double quantization, the absmax:
    dequantize_blockwise + add_ of the offset) for grad_A = grad @ W. The fused small-M kernel
    bitsandbytes picks for few tokens (`_gemm_4bit_use_custom_cuda`) is priced as this path."""
    k, n = w.in_features, w.out_features
    f = Sym(t=2 * k * n)
    deq_bytes = Sym(c=k * n * (0.5 + DTYPE_BYTES[compute]))
    tp.op(V, "view")
    tp.op(E, "dequantize_4bit", bytes=deq_bytes, dtype=compute)
    tp.op(V, "t")
    tp.op(M, "mm", flops=f, bytes=x.size + out.size + Sym(c=k * n * DTYPE_BYTES[compute]), dtype=compute,
          layout="linear", dims=(k, n))
    tp.op(V, "_unsafe_view")
    if x.rg:
        tp.bop(E, "dequantize_4bit", bytes=deq_bytes, dtype=compute)
        tp.bop(V, "t")
        tp.bop(M, "mm", flops=f, bytes=x.size + out.size + Sym(c=k * n * DTYPE_BYTES[compute]), dtype=compute,
               layout="grad_input", dims=(k, n))
        tp.bop(V, "_unsafe_view")


@dataclass(frozen=True, slots=True)
class Lora:
    rank: int
    dtype: str = "fp32"  # peft upcasts adapters of half-precision bases to fp32 (autocast_adapter_dtype)


def lora_linear(tp: Tape, x: Tensor, w: Weight, lora: Lora | None, autocast: str | None, name: str) -> Tensor:
    """peft's lora.Linear / lora.Linear4bit forward (dropout 0 is nn.Identity in peft)."""
    base = linear(tp, x, w, autocast, name)
    if lora is None:
        return base
    if w.quantized and tp.rec is not None:
        # peft's bnb LoRA clones the base output ("defensively", CloneBackward0 passes the gradient)
        cl = tp.out(tp.fn("pass", (base,)), tp.new(base.elems, base.dtype, base.rg, f"{name}.clone"))
        tp.drop(base)
        base = cl
    a = Weight(w.in_features, lora.rank, lora.dtype, True)
    b = Weight(lora.rank, w.out_features, lora.dtype, True)
    if w.quantized:
        # peft's bnb LoRA casts the input only when autocast is off
        xin = cast(tp, x, lora.dtype, f"{name}.lora_input") if not autocast else alias(x)
    else:
        xin = cast(tp, x, lora.dtype, f"{name}.lora_input")
    # peft rebinds `x` to its cast: it stays referenced until the forward returns
    ha = linear(tp, xin, a, autocast, f"{name}.lora_A")
    hb = linear(tp, ha, b, autocast, f"{name}.lora_B")
    tp.drop(ha)
    tp.module(2)  # the lora.Linear wrapper and its lora_dropout (nn.Identity at dropout 0)
    # * scaling (a Python float: saves nothing)
    scaled = unary(tp, hb, f"{name}.lora_scale", aten="mul", bwd=("mul",))
    tp.drop(hb)
    if w.quantized and not autocast:
        back = cast(tp, scaled, base.dtype, f"{name}.lora_out_cast")
        tp.drop(scaled)
        scaled = back
    summed = binary(tp, base, scaled, f"{name}.lora_add", saves=False)
    tp.drop(base, scaled)
    if w.quantized:
        tp.drop(xin)
        return summed
    res = cast(tp, summed, base.dtype, f"{name}.result_cast")  # result.to(torch_result_dtype)
    tp.drop(summed, xin)
    return res


# ---- backward formulas (planner.engine.autograd): what each node's backward allocates, in order ----
@formula("to_copy")
def _to_copy_backward(bw: Backward, n: Node, grads: list) -> list:
    """ToCopyBackward0: the gradient cast back to the input's dtype."""
    g = grads[0]
    elems, dtype, _ = n.inputs[0]
    return [bw.new(elems, dtype) if g is not None else None]


@formula("mul")
def _mul_backward(bw: Backward, n: Node, grads: list) -> list:
    """MulBackward0: the generated code computes `other`'s gradient (grad * self) first, then
    `self`'s (grad * other), each in the promoted dtype at the output's shape (validate_outputs sums a
    broadcast operand's back and casts it to its dtype)."""
    g = grads[0]
    (_, a_dt, a_edge), (_, b_dt, b_edge) = n.inputs
    out = n.outputs[0][0]
    gb = bw.new(out, promote(g.dtype, a_dt)) if (g is not None and b_edge is not None) else None
    ga = bw.new(out, promote(g.dtype, b_dt)) if (g is not None and a_edge is not None) else None
    return [ga, gb]


@formula("sub")
def _sub_backward(bw: Backward, n: Node, grads: list) -> list:
    """SubBackward0: the minuend gets the gradient, the subtrahend its negation."""
    g = grads[0]
    if g is None:
        return [None, None]
    ga = bw.share(g) if n.inputs[0][2] is not None else None
    gb = bw.new(n.outputs[0][0], g.dtype) if n.inputs[1][2] is not None else None
    return [ga, gb]


@formula("mm")
def _mm_backward(bw: Backward, n: Node, grads: list) -> list:
    """MmBackward0: the weight's gradient (mat2) first, then the input's (self), as the dry run's
    trace shows them."""
    g = grads[0]
    (x_el, _, x_edge), (w_el, _, w_edge) = n.inputs
    gw = bw.new(w_el, g.dtype) if (g is not None and w_edge is not None) else None
    gx = bw.new(x_el, g.dtype) if (g is not None and x_edge is not None) else None
    return [gx, gw]


@formula("addmm")
def _addmm_backward(bw: Backward, n: Node, grads: list) -> list:
    """AddmmBackward0: the bias gets the gradient itself (validate_outputs sums it), then mat1's
    gradient, then mat2's."""
    g = grads[0]
    (_, _, b_edge), (x_el, _, x_edge), (w_el, _, w_edge) = n.inputs
    if g is None:
        return [None, None, None]
    gb = bw.share(g) if b_edge is not None else None
    gx = bw.new(x_el, g.dtype) if x_edge is not None else None
    gw = bw.new(w_el, g.dtype) if w_edge is not None else None
    return [gb, gx, gw]


@formula("cat")
def _cat_backward(bw: Backward, n: Node, grads: list) -> list:
    """CatBackward0: each input's gradient is a narrow view of the output's."""
    g = grads[0]
    return [bw.share(g, el) if (g is not None and edge is not None) else None for el, _, edge in n.inputs]


@formula("slice")
def _slice_backward(bw: Backward, n: Node, grads: list) -> list:
    """SliceBackward0: slice_backward writes the gradient into zeros of the input's shape."""
    g = grads[0]
    return [bw.new(n.inputs[0][0], g.dtype) if g is not None else None]


@formula("matmul4bit")
def _matmul4bit_backward(bw: Backward, n: Node, grads: list) -> list:
    """MatMul4Bit.backward: grad_A = grad @ dequantize_4bit(W): with double quantization the absmax
    dequantized first (dequantize_blockwise, fp32, freed when dequantize_4bit returns), the [N, K]
    weight in the compute dtype, the product; the weight goes after it."""
    g = grads[0]
    if g is None or n.inputs[0][2] is None:
        return [None]
    m = n.meta
    absmax = bw.rec.alloc(Sz(c=m["blocks"] * 4)) if m["nested"] else None
    w = bw.rec.alloc(Sz(c=m["n"] * DTYPE_BYTES[m["dtype"]]))
    bw.rec.unref(absmax)
    out = bw.new(n.inputs[0][0], g.dtype)
    bw.rec.unref(w)
    return [out]
