"""Operations as PyTorch runs them on CUDA, for the symbolic tape.

Each function allocates the outputs the real op allocates and saves for backward what autograd
saves: an input is saved only when the gradient that needs it is computed (PyTorch's codegen guards
saved variables with `should_compute_output`). Autocast follows CUDA's policy: matmuls run in the
autocast dtype (a cast copy of an input in another dtype is made; the cast of a weight that is a leaf
requiring grad is cached for the forward and saved for backward), norms, softmax and pow run in fp32,
elementwise ops follow type promotion. Callers drop what the Python program stops referencing.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.engine.tape import DTYPE_BYTES, Sym, Tape, Tensor, fixed, tok


@dataclass(frozen=True, slots=True)
class Weight:
    """One linear layer's weight as the program holds it."""

    in_features: int
    out_features: int
    dtype: str  # storage dtype of a dense weight; "nf4"/"fp4" for bitsandbytes Linear4bit
    trainable: bool
    bias: bool = False

    @property
    def quantized(self) -> bool:
        return self.dtype in ("nf4", "fp4")


def promote(a: str, b: str) -> str:
    return a if DTYPE_BYTES[a] >= DTYPE_BYTES[b] else b


def alias(x: Tensor) -> Tensor:
    x.refs += 1
    return x


def cast(tp: Tape, x: Tensor, dtype: str, name: str) -> Tensor:
    """`x.to(dtype)`: the same tensor when the dtype already matches, else a copy; saves nothing."""
    if x.dtype == dtype:
        return alias(x)
    return tp.new(x.elems, dtype, x.rg, name)


def binary(tp: Tape, a: Tensor, b: Tensor, name: str, saves: bool) -> Tensor:
    """Elementwise a (op) b with broadcasting: the output has the larger operand's elements.

    `saves`: mul-like (each operand is saved when the other's gradient is needed) or add-like.
    """
    dtype = promote(a.dtype, b.dtype)
    big = a if a.elems.t >= b.elems.t else b
    out = tp.new(big.elems, dtype, a.rg or b.rg, name)
    if saves:
        if a.rg:
            tp.save(b)
        if b.rg:
            tp.save(a)
    return out


def unary(tp: Tape, x: Tensor, name: str, saves_input: bool = False, saves_output: bool = False,
          dtype: str | None = None, elems: Sym | None = None) -> Tensor:
    out = tp.new(elems if elems is not None else x.elems, dtype or x.dtype, x.rg, name)
    if x.rg and saves_input:
        tp.save(x)
    if x.rg and saves_output:
        tp.save(out)
    return out


def dropout(tp: Tape, x: Tensor, p: float, training: bool, name: str) -> Tensor:
    """F.dropout: the input itself when p == 0 or in eval (ATen returns it); else CUDA's
    native_dropout, which returns the output and a bool mask that backward keeps."""
    if p == 0 or not training:
        return alias(x)
    out = tp.new(x.elems, x.dtype, x.rg, name)
    mask = tp.new(x.elems, "bool", False, f"{name}.mask")
    if x.rg:
        tp.save(mask)
    tp.drop(mask)
    return out


def linear(tp: Tape, x: Tensor, w: Weight, autocast: str | None, name: str) -> Tensor:
    """nn.Linear (dense) or bitsandbytes Linear4bit; the caller still owns (and drops) `x`."""
    if w.quantized:
        return linear4bit(tp, x, w, name)
    compute = autocast or x.dtype
    xin = cast(tp, x, compute, f"{name}.input_cast") if autocast else alias(x)
    n_w = fixed(w.in_features * w.out_features)
    if autocast and w.dtype != compute:
        # Autocast casts the weight for the matmul; for a trainable leaf the cast is cached for the
        # whole forward and saved for backward, a frozen one is cast per call.
        wt = tp.new(n_w, compute, w.trainable, f"{name}.weight_cast")
        if w.trainable:
            tp.autocast_cached = tp.autocast_cached + wt.size
    else:
        wt = tp.external(n_w, w.dtype, w.trainable)
    out = tp.new(tok(w.out_features), compute, x.rg or w.trainable, name)
    if w.trainable:
        tp.save(xin)
    if x.rg:
        tp.save(wt)
    tp.drop(xin, wt)
    return out


def linear4bit(tp: Tape, x: Tensor, w: Weight, name: str, compute: str = "bf16") -> Tensor:
    """bnb.nn.Linear4bit.forward: x.to(compute_dtype) -> matmul_4bit -> .to(input dtype).

    The 4-bit matmul dequantizes the whole weight to the compute dtype (a transient of out x in
    elements) and saves no activation for backward (it dequantizes again there).
    """
    xin = cast(tp, x, compute, f"{name}.input_cast")
    deq = tp.new(fixed(w.in_features * w.out_features), compute, False, f"{name}.dequant")
    out = tp.new(tok(w.out_features), compute, x.rg, name)
    tp.drop(deq, xin)
    res = cast(tp, out, x.dtype, f"{name}.output_cast")
    tp.drop(out)
    return res


@dataclass(frozen=True, slots=True)
class Lora:
    rank: int
    dtype: str = "fp32"  # peft upcasts adapters of half-precision bases to fp32 (autocast_adapter_dtype)


def lora_linear(tp: Tape, x: Tensor, w: Weight, lora: Lora | None, autocast: str | None, name: str) -> Tensor:
    """peft's lora.Linear / lora.Linear4bit forward (dropout 0 is nn.Identity in peft)."""
    base = linear(tp, x, w, autocast, name)
    if lora is None:
        return base
    a = Weight(w.in_features, lora.rank, lora.dtype, True)
    b = Weight(lora.rank, w.out_features, lora.dtype, True)
    if w.quantized:
        # peft's bnb LoRA casts the input only when autocast is off
        xin = cast(tp, x, lora.dtype, f"{name}.lora_input") if not autocast else alias(x)
    else:
        xin = cast(tp, x, lora.dtype, f"{name}.lora_input")
    ha = linear(tp, xin, a, autocast, f"{name}.lora_A")
    tp.drop(xin)
    hb = linear(tp, ha, b, autocast, f"{name}.lora_B")
    tp.drop(ha)
    scaled = unary(tp, hb, f"{name}.lora_scale")  # * scaling (a Python float: saves nothing)
    tp.drop(hb)
    if w.quantized and not autocast:
        back = cast(tp, scaled, base.dtype, f"{name}.lora_out_cast")
        tp.drop(scaled)
        scaled = back
    summed = binary(tp, base, scaled, f"{name}.lora_add", saves=False)
    tp.drop(base, scaled)
    if w.quantized:
        return summed
    res = cast(tp, summed, base.dtype, f"{name}.result_cast")  # result.to(torch_result_dtype)
    tp.drop(summed)
    return res
