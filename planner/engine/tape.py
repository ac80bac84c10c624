"""A symbolic replay of a step's allocations: sizes as polynomials in the token count.

Every size is `c + t*T + q*T*S` bytes, where T = batch*seq tokens and S = seq (only eager attention's
S x S scores need the `q` term). A recipe (see `layers.py`) walks the operations of one module the way
PyTorch executes them and tells the tape which tensors are created, which the program drops and which
autograd saves for backward, following autograd's rule that an op saves an input only when the
gradient that needs it will be computed. The tape records the live bytes after every allocation, so
the peak over a module is known symbolically and can be evaluated for any batch and sequence length
without replaying the recipe again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from planner.engine.autograd import Node, Recorder, Storage

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "int64": 8, "uint8": 1, "bool": 1}


@dataclass(frozen=True, slots=True)
class Sym:
    """Bytes as c + t*T + q*T*S."""

    c: float = 0.0
    t: float = 0.0
    q: float = 0.0

    def __add__(self, o: "Sym") -> "Sym":
        return Sym(self.c + o.c, self.t + o.t, self.q + o.q)

    def __sub__(self, o: "Sym") -> "Sym":
        return Sym(self.c - o.c, self.t - o.t, self.q - o.q)

    def __mul__(self, k: float) -> "Sym":
        return Sym(self.c * k, self.t * k, self.q * k)

    __rmul__ = __mul__

    def at(self, tokens: float, seq: float) -> float:
        """c + t*T + q*T*S, exact for any integer T and S (see `exact_at`)."""
        if tokens <= FAST_TOKENS and tokens * seq <= FAST_TOKEN_POSITIONS:
            return self.c + self.t * tokens + self.q * tokens * seq
        return exact_at(self, tokens, seq)

    def dominates(self, o: "Sym") -> bool:
        return self.c >= o.c and self.t >= o.t and self.q >= o.q


ZERO = Sym()

# the dry run's recorder's kinds (planner.backends.measurement.OP_KINDS): matmul, attention (SDPA
# kernels), elementwise (every other kernel), foreach (one _foreach_* op), view (metadata only),
# sync (a host read of a device value), host (an op on host tensors: no kernel), other (bookkeeping)
KINDS: tuple[str, ...] = ("matmul", "attention", "elementwise", "foreach", "view", "sync", "host", "other")


@dataclass(frozen=True, slots=True)
class Op:
    """`count` identical aten ops: each computes `flops` and moves `bytes` (read + written)."""

    kind: str
    name: str
    flops: Sym = ZERO
    bytes: Sym = ZERO
    dtype: str = "fp32"
    count: int = 1
    tensors: int = 1  # the tensors of a _foreach_* op's list (bytes: over all of them)
    # a matmul's operand layout (planner.profiles.MATMUL_LAYOUTS: linear, grad_input, grad_weight;
    # "" where it is none of a Linear layer's three): what the profile's layout curves price
    layout: str = ""
    # a Linear layer's matmul: the layer's (in_features, out_features); its tokens M = FLOPs / (2 K N).
    # What a profile's matmul_shapes price it by. An SDPA kernel: (head dim, query rows: 0 for a causal
    # prefill, 1 for a decode step), its key length N the S it is priced at (attention_shapes). () where
    # the op is neither
    dims: tuple[int, int] | tuple[()] = ()

    def times(self, n: int) -> "Op":
        return Op(self.kind, self.name, self.flops, self.bytes, self.dtype, self.count * n, self.tensors, self.layout,
                  self.dims)


@dataclass
class OpList:
    """Ops in program order, and the nn.Module calls that issued them (host cost per call)."""

    ops: list[Op] = field(default_factory=list)
    modules: int = 0
    # host work that dispatches no op, by the profile's HostCosts field that prices it:
    # {"layer_s": 1} for a decoder layer's own Python, {"model_s": 1} for a model forward's...
    calls: dict[str, float] = field(default_factory=dict)

    def call(self, name: str, n: float = 1) -> None:
        self.calls[name] = self.calls.get(name, 0) + n

    def add(self, kind: str, name: str, flops: Sym = ZERO, bytes: Sym = ZERO, dtype: str = "fp32",
            count: int = 1, tensors: int = 1, layout: str = "", dims: tuple[int, int] | tuple[()] = ()) -> None:
        if count:
            self.ops.append(Op(kind, name, flops, bytes, dtype, count, tensors, layout, dims))

    def extend(self, other: "OpList", times: int = 1) -> None:
        if times <= 0:
            return
        self.ops.extend(op.times(times) if times != 1 else op for op in other.ops)
        self.modules += other.modules * times
        for k, v in other.calls.items():
            self.call(k, v * times)

    def scaled(self, times: int) -> "OpList":
        out = OpList()
        out.extend(self, times)
        return out

    def counts(self) -> dict[str, int]:
        """Aten ops per kind."""
        out = {k: 0 for k in KINDS}
        for op in self.ops:
            out[op.kind] += op.count
        return out

    def names(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            out[op.name] = out.get(op.name, 0) + op.count
        return out

    def flops(self, tokens: float, seq: float) -> dict[str, float]:
        """FLOPs per kind at T = tokens, S = seq."""
        out: dict[str, float] = {}
        for op in self.ops:
            if op.flops != ZERO:
                out[op.kind] = out.get(op.kind, 0.0) + op.count * float(op.flops.at(tokens, seq))
        return out

# Below these sizes float arithmetic is exact: coefficients are whole (or dyadic, like nf4's half a
# byte) numbers of bytes with t < 2^26 bytes per token (a 256k vocabulary's fp32 logits and their
# copies) and q < 2^16 bytes per token and position (eager attention's scores), so every term stays
# below 2^52. Beyond them (a batch of 10^12 is a fair question) the sum is taken in rationals.
FAST_TOKENS = 1 << 26
FAST_TOKEN_POSITIONS = 1 << 36


def exact_at(s: Sym, tokens: float, seq: float) -> Fraction | float:
    """c + t*T + q*T*S in exact rational arithmetic (each float coefficient is a binary fraction)."""
    if isinstance(tokens, float) or isinstance(seq, float):
        return s.c + s.t * tokens + s.q * tokens * seq
    return Fraction(s.c) + Fraction(s.t) * tokens + Fraction(s.q) * tokens * seq


def tok(elements: float) -> Sym:
    """Elements per token."""
    return Sym(t=elements)


def fixed(elements: float) -> Sym:
    """Elements independent of the token count (weights and their casts)."""
    return Sym(c=elements)


@dataclass(slots=True, eq=False)
class Tensor:
    elems: Sym  # element count (c + t*T + q*T*S)
    dtype: str
    rg: bool  # requires grad
    name: str = ""
    saved: bool = False
    refs: int = 1  # program references (Python names) still holding it
    # A parameter (or other tensor that lives outside the recipe): never counted by the tape.
    external: bool = False
    # ops that will send this tensor a gradient: autograd adds the gradients of a tensor used k times
    uses: int = 0
    # with an allocation recorder (planner.engine.autograd): the storage it holds a reference to, the
    # autograd edge its gradient goes to, and a parameter's name (its AccumulateGrad)
    st: "Storage | None" = None
    edge: "tuple[Node, int] | None" = None
    key: str | None = None

    @property
    def size(self) -> Sym:
        return self.elems * DTYPE_BYTES[self.dtype]


@dataclass(slots=True)
class Tape:
    """Live bytes of a module's forward, relative to what was live when it started."""

    grad: bool = True
    # False inside a checkpointed region: ops run with grad but autograd keeps nothing
    keep_saved: bool = True
    live: Sym = ZERO
    saved_total: Sym = ZERO
    # casts CUDA autocast caches for the whole autocast region (weights that are leaves requiring grad)
    autocast_cached: Sym = ZERO
    events: list[tuple[str, Sym]] = field(default_factory=list)
    # the aten ops the recipe dispatches in its forward, and those autograd runs for its backward
    fwd: OpList = field(default_factory=OpList)
    bwd: OpList = field(default_factory=OpList)
    used: list["Tensor"] = field(default_factory=list)
    slots: int = 0  # saved tensors that require grad
    last_saving: int = -1  # index in fwd.ops of the last op that saves a tensor requiring grad
    # the allocation recorder (planner.engine.autograd): when set, every tensor made is an allocation
    # event, every last reference dropped a free, and every op autograd records a node
    rec: "Recorder | None" = None
    scope: str = ""  # the module path of the recipe now running (names parameters for the recorder)
    kv: Any = None  # a generation's KV cache (planner.engine.steptrace.KVCache): attention updates it

    # ---- ops (for time) ---------------------------------------------------------------------
    def op(self, kind: str, name: str, flops: Sym = ZERO, bytes: Sym = ZERO, dtype: str = "fp32",
           count: int = 1, layout: str = "", dims: tuple[int, int] | tuple[()] = ()) -> None:
        """A forward aten op (a Linear layer's matmul: its layout and the layer's (in, out) dims)."""
        self.fwd.add(kind, name, flops, bytes, dtype, count, layout=layout, dims=dims)

    def bop(self, kind: str, name: str, flops: Sym = ZERO, bytes: Sym = ZERO, dtype: str = "fp32",
            count: int = 1, layout: str = "", dims: tuple[int, int] | tuple[()] = ()) -> None:
        """An aten op of the backward (recorded only where autograd records the graph)."""
        if self.grad:
            self.bwd.add(kind, name, flops, bytes, dtype, count, layout=layout, dims=dims)

    def module(self, n: int = 1) -> None:
        """nn.Module calls (host cost per call)."""
        self.fwd.modules += n

    def saving(self, *ts: "Tensor") -> None:
        """The next forward op will save some of these tensors: where a checkpoint's recompute stops
        (torch's non-reentrant checkpoint stops once the last saved tensor is packed, which autograd
        does before the op's kernel runs)."""
        if self.grad and any(t.rg for t in ts):
            self.last_saving = len(self.fwd.ops)

    def use(self, *ts: "Tensor") -> None:
        """These tensors are inputs of an op that will send them a gradient."""
        if not self.grad:
            return
        for t in ts:
            if t.rg:
                if t.uses == 0:
                    self.used.append(t)
                t.uses += 1

    def backward_ops(self) -> OpList:
        """The backward's ops: each op's own, plus autograd's sum of the gradients of every tensor
        used more than once (one `add` per extra use, in the tensor's dtype)."""
        out = OpList(list(self.bwd.ops), self.bwd.modules)
        for t in self.used:
            if t.uses > 1:
                out.add("elementwise", "add", bytes=t.size * 3, dtype=t.dtype, count=t.uses - 1)
        return out

    # ---- primitives -------------------------------------------------------------------------
    def new(self, elems: Sym, dtype: str, rg: bool, name: str) -> Tensor:
        t = Tensor(elems, dtype, rg and self.grad, name)
        self.live = self.live + t.size
        self.events.append((name, self.live))
        if self.rec is not None:
            from planner.engine.autograd import sz_of

            t.st = self.rec.alloc(sz_of(elems, dtype, self.rec.per_sequence))
            if self.rec.recompute_tensors is not None:
                self.rec.recompute_tensors.append(t)
        return t

    def external(self, elems: Sym, dtype: str, rg: bool, name: str = "param") -> Tensor:
        """A tensor allocated outside this recipe (a parameter, the module's input)."""
        return Tensor(elems, dtype, rg and self.grad, name, external=True)

    def raw(self, size: Any, name: str, dtype: str = "int64") -> Tensor:
        """A tensor only the recorder allocates (planner.engine.autograd.Sz: its bytes may have terms in
        the batch or the sequence alone, which the tape's elements cannot express); outside the tape's
        own accounting, never requiring grad."""
        t = Tensor(ZERO, dtype, False, name, external=True)
        if self.rec is not None:
            t.st = self.rec.alloc(size)
            if self.rec.recompute_tensors is not None:
                self.rec.recompute_tensors.append(t)
        return t

    def param(self, elems: Sym, dtype: str, rg: bool, name: str, key: str | None = None) -> Tensor:
        """A module's parameter `name` (its AccumulateGrad is keyed by the recipe's scope and name, or
        by `key`: a tied weight's owner)."""
        t = Tensor(elems, dtype, rg and self.grad, name, external=True)
        t.key = key or (f"{self.scope}.{name}" if self.scope else name)
        return t

    # ---- autograd, for the allocation recorder ---------------------------------------------
    def fn(self, kind: str, inputs: "tuple[Tensor, ...] | list[Tensor]", saved: "tuple[Tensor, ...] | list[Tensor]" = (),
           **meta: Any) -> "Node | None":
        """Autograd records this op (grad mode on, an input requires grad): its node, numbered now (before
        the op's outputs exist), with `saved` packed (inputs are packed before the kernel runs). Nothing
        without a recorder."""
        rec = self.rec
        if rec is None or not self.grad or not any(t.rg for t in inputs):
            return None
        node = rec.node(kind, [(t.elems, t.dtype, self._edge(t) if t.rg else None) for t in inputs], meta)
        for t in saved:
            rec.save(node, t.st)
        return node

    def _edge(self, t: Tensor) -> "tuple[Node, int] | None":
        if t.edge is not None:
            return t.edge
        if t.key is not None and self.rec is not None:
            return self.rec.param_edge(t.key, t.elems, t.dtype, leaf=None if t.external else t.st)
        return None

    def out(self, node: "Node | None", t: Tensor, saved: bool = False) -> Tensor:
        """`t` is the node's next output (its gradient flows into the node); `saved`: the op saves it."""
        if node is not None:
            t.edge = (node, len(node.outputs))
            node.outputs.append((t.elems, t.dtype))
            if saved and self.rec is not None:
                self.rec.save(node, t.st)
        return t

    def view(self, t: Tensor, kind: str = "view", elems: Sym | None = None, name: str = "") -> Tensor:
        """A view of `t` (its storage, another tensor): a node whose backward reshapes the gradient
        (`kind` "view"), copies it ("view_copy": a reshape that cannot view) or scatters it into
        zeros ("slice": slice_backward)."""
        # external: the tape's own accounting counts the base tensor, not its views
        v = Tensor(elems if elems is not None else t.elems, t.dtype, t.rg, name or t.name + ".view", external=True)
        if self.rec is not None and t.st is not None:
            self.rec.ref(t.st)
            v.st = t.st
            if self.rec.recompute_tensors is not None:
                self.rec.recompute_tensors.append(v)
        self.out(self.fn(kind, (t,)), v)
        return v

    def reshape(self, t: Tensor, kind: str = "view") -> Tensor:
        """`t = t.view(...)`: the same program variable rebound to a view (a node in the graph)."""
        node = self.fn(kind, (t,))
        if node is not None:
            self.out(node, t)
        return t

    def save(self, *ts: Tensor) -> None:
        if self.grad:  # saved tensors that require grad (checkpoint's hooks detach each)
            self.slots += sum(1 for t in ts if t.rg)
        if not (self.grad and self.keep_saved):
            return
        for t in ts:
            if t.external or t.saved:
                continue
            t.saved = True
            self.saved_total = self.saved_total + t.size

    def drop(self, *ts: Tensor) -> None:
        """The program no longer references these tensors (Python variable reassigned or out of scope)."""
        for t in ts:
            if t.refs <= 0:
                continue
            if t.external:
                if t.st is not None and self.rec is not None:  # a view of a recorded storage
                    t.refs = 0
                    self.rec.unref(t.st)
                continue
            t.refs -= 1
            if t.refs == 0:
                if not t.saved:
                    self.live = self.live - t.size
                if t.st is not None and self.rec is not None:
                    self.rec.unref(t.st)

    def peak_candidates(self) -> list[Sym]:
        """Non-dominated live totals over the recorded events."""
        return pareto([s for _, s in self.events])


def pareto(syms: list[Sym]) -> list[Sym]:
    """Drop every size that another one is at least as large as for all batch and sequence sizes."""
    out: list[Sym] = []
    for s in syms:
        if any(o.dominates(s) for o in out):
            continue
        out = [o for o in out if not s.dominates(o)] + [s]
    return out or [ZERO]
