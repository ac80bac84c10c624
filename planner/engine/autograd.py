"""A step's allocation trace, replayed symbolically: every block the program asks the caching
allocator for and gives back, in program order, with sizes symbolic in batch and sequence length.

The recipes (layers.py, ops.py, heads.py) run on a `Tape` with a `Recorder` attached: each tensor
they make gets a storage (an allocation event), each reference the Python program drops releases
it (a free event when the last holder goes), and each op that autograd records registers a `Node`
with the tensors it saves and its backward formula. `Recorder.backward` then runs the graph as
torch's engine does (torch/csrc/autograd/engine.cpp), and emits what the backward allocates:

- ready nodes run highest sequence number first (nodes are numbered as the forward creates them;
  AccumulateGrad, numbered UINT64_MAX, runs as soon as it is ready);
- a node runs its formula (the allocations of tools/autograd/derivatives.yaml's expressions, in the
  generated code's order), then `validate_outputs` sums a broadcast gradient back to its input's
  shape (at::sum_to) and casts it to the input's dtype; then its gradient inputs are dropped, then
  its saved tensors are released (`release_variables`);
- a gradient arriving where one is already buffered is added in place into the buffered one when
  that holds the last reference (the dry run's tracker rewrites the out-of-place add it sees into
  this: planner/backends/dryrun/_tracker.py), else into a new block;
- AccumulateGrad steals the gradient into `.grad` (no copy), or adds into an existing `.grad`;
- non-reentrant activation checkpointing (torch.utils.checkpoint, use_reentrant=False): a
  checkpointed region saves nothing in its forward; the first unpack in backward re-runs the region
  (its allocations traced as they happen), keeping each tensor it packs for its node and stopping
  once the last one is packed (early stop); an unpacked tensor lives until its node's formula ends.

Sizes are `Sz` (bytes as a polynomial in batch B and sequence S) or a `SizeFn` (a kernel's
workspace with a rounding or a threshold); the event list is built once per plan shape and
evaluated at the plan's numbers (`Trace.at`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}
ACCUMULATE_SEQ = 1 << 64  # AccumulateGrad's sequence number (UINT64_MAX): it runs as soon as it is ready


@dataclass(frozen=True, slots=True)
class Sz:
    """Bytes as c + b*B + s*S + t*B*S + q*B*S^2 + r*S^2 (B: batch, S: sequence length), integer
    coefficients (r: a (S, S) table of the whole batch, as eager attention's causal mask before it
    is broadcast to the batch)."""

    c: int = 0
    b: int = 0
    s: int = 0
    t: int = 0
    q: int = 0
    r: int = 0

    def at(self, batch: int, seq: int) -> int:
        return int(self.c + self.b * batch + (self.s + self.r * seq) * seq + (self.t + self.q * seq) * batch * seq)

    def __add__(self, o: "Sz") -> "Sz":
        return Sz(self.c + o.c, self.b + o.b, self.s + o.s, self.t + o.t, self.q + o.q, self.r + o.r)

    def __mul__(self, k: int) -> "Sz":
        return Sz(self.c * k, self.b * k, self.s * k, self.t * k, self.q * k, self.r * k)

    __rmul__ = __mul__


@dataclass(frozen=True, slots=True)
class SizeFn:
    """Bytes that are not a polynomial in B and S (a kernel workspace rounded up to a tile, or made
    only past a threshold): fn(B, S, *args)."""

    fn: Callable[..., int]
    args: tuple = ()

    def at(self, batch: int, seq: int) -> int:
        return self.fn(batch, seq, *self.args)


Size = Sz | SizeFn
ZERO_SZ = Sz()


def sz_of(elems: Any, dtype: str, per_sequence: bool = False) -> Sz:
    """A tape tensor's bytes (elements c + t*T + q*T*S, planner.engine.tape.Sym; or an Sz of elements,
    for a tensor of a size per sequence) as an Sz. `per_sequence`: the recipe runs over one token per
    sequence (a decode step, the last position's head), so its per-token elements count per sequence."""
    nb = DTYPE_BYTES[dtype]
    if isinstance(elems, Sz):
        return elems * nb
    c, t, q = elems.c * nb, elems.t * nb, elems.q * nb
    if c != int(c) or t != int(t) or q != int(q):
        raise ValueError(f"allocation trace: a fractional byte count ({c}, {t}, {q}) for {dtype}")
    if per_sequence:
        if q:
            raise ValueError("allocation trace: a per-position term in a one-token forward")
        return Sz(c=int(c), b=int(t))
    return Sz(c=int(c), t=int(t), q=int(q))


class Storage:
    """One allocation; `refs` counts its holders (program names, saved variables, gradient buffers).
    `grad`: the gradient autograd accumulated into a non-parameter leaf held in this storage (it goes
    with the tensor)."""

    __slots__ = ("id", "size", "refs", "grad")

    def __init__(self, sid: int, size: Size) -> None:
        self.id, self.size, self.refs, self.grad = sid, size, 0, None


class G:
    """A gradient value in the backward: a holder of one reference to its storage."""

    __slots__ = ("st", "elems", "dtype")

    def __init__(self, st: Storage | None, elems: Any, dtype: str) -> None:
        self.st, self.elems, self.dtype = st, elems, dtype


class Holder:
    """A tensor saved inside a checkpointed region: nothing kept in the forward; filled by the recompute."""

    __slots__ = ("frame", "st")

    def __init__(self, frame: "Frame") -> None:
        self.frame, self.st = frame, None


@dataclass
class Frame:
    """One checkpointed region (torch.utils.checkpoint's _CheckpointFrame): its holders in packing
    order, how to re-run it (`recompute(recorder)` replays the region's recipe), and the storages its
    input saver keeps (the region's tensor arguments and keyword arguments): they go when the frame
    does, once the last of its holders is released."""

    recompute: Callable[["Recorder"], None]
    holders: list[Holder] = field(default_factory=list)
    done: bool = False
    packed: int = 0
    inputs: list[Any] = field(default_factory=list)
    released: int = 0


class StopRecompute(Exception):
    """torch.utils.checkpoint's early stop: the recompute packed its last saved tensor."""


@dataclass(eq=False)
class Node:
    """An autograd node: its inputs' metadata (elements, dtype, the edge their gradient goes to),
    what it saved, and its formula (name into BACKWARD, with `meta`)."""

    seq: int
    kind: str
    inputs: list[tuple[Any, str, Any]]  # (elems, dtype, edge) per input; edge: (Node, input_nr) or None
    saved: list[Any] = field(default_factory=list)  # Storage (kept) or Holder (checkpointed)
    outputs: list[tuple[Any, str]] = field(default_factory=list)  # (elems, dtype) per output
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # a parameter's name (AccumulateGrad)


# A formula: fn(bw, node, grads) -> one gradient (G or None) per node input, allocating through bw.
BACKWARD: dict[str, Callable[["Backward", Node, list], list]] = {}


def formula(*names: str):
    def deco(fn):
        for n in names:
            BACKWARD[n] = fn
        return fn
    return deco


class Recorder:
    """Storages, events and the autograd graph of one traced program."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self._ids = 0
        self._seq = 0
        self.params: dict[str, Node] = {}  # AccumulateGrad nodes by parameter name
        self.grads: dict[str, G] = {}  # .grad of each parameter
        self.frame: Frame | None = None  # the checkpointed region whose forward runs now
        self.recomputing: Frame | None = None
        self.recompute_tensors: list[Any] | None = None  # the recompute's program tensors (dropped at its end)
        self.phase = "setup"
        # autocast's cache of parameter casts (by parameter name), emptied when the region ends
        self.autocast_cache: dict[str, Any] = {}
        # the cuBLAS workspace: allocated after the first matmul of the forward thread
        self.workspace: Size | None = None
        self.in_backward = False
        self.sdpa_backend = "cudnn"
        # the recipes now run over one token per sequence (their per-token sizes count per sequence)
        self.per_sequence = False
        # the graph's nodes since the last release (saved tensors of nodes backward never ran), and
        # the non-parameter leaves their AccumulateGrad nodes hold
        self.graph: list[Node] = []
        self.graph_leaves: list[Storage] = []
        # parameters' storages by name, where a program replaces one (Linear4bit's bias cast)
        self.storages: dict[str, Storage] = {}

    # ---- storages and events ------------------------------------------------------------
    def alloc(self, size: Size, stream: int = 0) -> Storage:
        self._ids += 1
        st = Storage(self._ids, size)
        st.refs = 1
        self.events.append(("a", st.id, size, stream))
        return st

    def ref(self, st: Storage | None) -> None:
        if st is not None:
            st.refs += 1

    def unref(self, st: Storage | None) -> None:
        if st is None:
            return
        st.refs -= 1
        if st.refs == 0:
            self.events.append(("f", st.id))
            if st.grad is not None:
                g, st.grad = st.grad, None
                self.unref(g.st)
        elif st.refs < 0:
            raise AssertionError(f"allocation trace: storage {st.id} released twice")

    def matmul(self) -> None:
        """A matmul ran: the forward thread's first one makes its cuBLAS handle's workspace."""
        if self.workspace is not None and not self.in_backward and self.recomputing is None:
            self.alloc(self.workspace)
            self.workspace = None

    def exit_autocast(self) -> None:
        """The autocast region ends: its cached parameter casts are dropped."""
        for t in self.autocast_cache.values():
            self.unref(t.st)
        self.autocast_cache.clear()

    def release_holder(self, h: "Holder") -> None:
        fr = h.frame
        self.unref(h.st)
        h.st = None
        fr.released += 1
        if fr.released == len(fr.holders):
            for st in fr.inputs:
                self.unref(st)
            fr.inputs = []

    def event(self, *ev: Any) -> None:
        self.events.append(tuple(ev))

    def set_phase(self, name: str) -> None:
        if name != self.phase:
            self.events.append(("phase", name))
            self.phase = name

    # ---- the graph ---------------------------------------------------------------------
    def node(self, kind: str, inputs: list[tuple[Any, str, Any]], meta: dict[str, Any] | None = None) -> Node:
        self._seq += 1
        n = Node(self._seq, kind, inputs, meta=meta or {})
        if self.recomputing is None:
            self.graph.append(n)
        return n

    def release_graph(self, taken: "tuple[list[Node], list[Storage], list[str]] | None" = None) -> None:
        """The program drops the last tensor whose grad_fn reaches the graph (the step's outputs): the
        saved tensors of nodes backward did not run go, and the leaves their AccumulateGrad nodes
        held (a leaf's .grad with it). `taken`: a graph `take_graph` set apart, instead of the current one."""
        graph, leaves, keys = taken if taken is not None else self.take_graph()
        for n in graph:
            for st in n.saved:
                if isinstance(st, Storage):
                    self.unref(st)
            n.saved = []
        for st in leaves:
            self.unref(st)
        for key in keys:
            self.params.pop(key, None)

    def take_graph(self) -> "tuple[list[Node], list[Storage], list[str]]":
        """Set the graph recorded so far apart (a micro-batch's, which its output keeps alive until the
        program rebinds that output): later nodes form a new graph; `release_graph(taken)` drops it."""
        taken = (self.graph, self.graph_leaves,
                 [k for k, n in self.params.items() if n.meta.get("leaf") is not None])
        self.graph, self.graph_leaves = [], []
        return taken

    def param_edge(self, key: str, elems: Any, dtype: str, leaf: Storage | None = None) -> tuple[Node, int]:
        """The AccumulateGrad of parameter `key` (or of a non-parameter leaf held in `leaf`)."""
        n = self.params.get(key)
        if n is None:
            n = Node(ACCUMULATE_SEQ, "accumulate_grad", [(elems, dtype, None)], key=key,
                     meta={"leaf": leaf} if leaf is not None else {})
            self.params[key] = n
            if leaf is not None:  # AccumulateGrad holds its variable: the leaf lives as long as the graph
                self.ref(leaf)
                self.graph_leaves.append(leaf)
        return (n, 0)

    def save(self, node: Node, st: Storage | None) -> None:
        """Autograd packs a tensor for `node`: kept (a reference) or, inside a checkpointed region,
        a holder; during a recompute the next holder is filled (and the recompute stops after the
        last one)."""
        if self.recomputing is not None:
            fr = self.recomputing
            if fr.packed < len(fr.holders):
                h = fr.holders[fr.packed]
                if h.st is None and st is not None:
                    self.ref(st)
                    h.st = st
            fr.packed += 1
            if fr.packed == len(fr.holders):
                raise StopRecompute
            return
        if self.frame is not None:
            h = Holder(self.frame)
            self.frame.holders.append(h)
            node.saved.append(h)
            return
        if st is not None:
            self.ref(st)
        node.saved.append(st)

    # ---- backward ------------------------------------------------------------------------
    def backward(self, root: tuple[Node, int], root_elems: Any, root_dtype: str = "fp32") -> None:
        """`loss.backward()`: the root gradient (ones_like), then the graph as torch's engine runs it."""
        bw = Backward(self)
        g = bw.new(root_elems, root_dtype)
        self.in_backward = True
        try:
            bw.run({root[0]: {root[1]: bw.share(g)}})
        finally:
            self.in_backward = False
        # the graph task holds its root gradient until the backward ends
        bw.drop(g)


class Backward:
    """One run of the engine over the recorded graph."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def new(self, elems: Any, dtype: str, size: Size | None = None) -> G:
        st = self.rec.alloc(size if size is not None else sz_of(elems, dtype))
        return G(st, elems, dtype)

    def workspace(self, size: Size) -> None:
        """A block a kernel allocates and frees inside the op."""
        st = self.rec.alloc(size)
        self.rec.unref(st)

    def share(self, g: G, elems: Any = None, dtype: str | None = None) -> G:
        """Another holder of the same storage (a view, or a gradient passed through)."""
        self.rec.ref(g.st)
        return G(g.st, g.elems if elems is None else elems, dtype or g.dtype)

    def drop(self, g: G | None) -> None:
        if g is not None:
            self.rec.unref(g.st)

    def run(self, roots: dict[Node, dict[int, G]]) -> None:
        rec = self.rec
        deps: dict[Node, int] = {}
        # dependencies: incoming edges from nodes reachable from the roots (engine.cpp compute_dependencies)
        stack = list(roots)
        seen = set(stack)
        while stack:
            n = stack.pop()
            for _e, _d, edge in n.inputs:
                if edge is None:
                    continue
                nxt = edge[0]
                deps[nxt] = deps.get(nxt, 0) + 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        buffers: dict[Node, dict[int, G]] = {n: dict(b) for n, b in roots.items()}
        ready: list[tuple[int, int, Node]] = []
        tie = 0
        for n in roots:
            if deps.get(n, 0) == 0:
                heapq.heappush(ready, (-n.seq, tie, n))
                tie += 1
        while ready:
            _, _, n = heapq.heappop(ready)
            grads = buffers.pop(n, {})
            if n.kind == "accumulate_grad":
                self._accumulate_grad(n, grads.get(0))
                continue
            outs = self._call(n, [grads.get(i) for i in range(len(n.outputs) or max(grads, default=-1) + 1)])
            for i, g in enumerate(outs):
                edge = n.inputs[i][2] if i < len(n.inputs) else None
                if g is None:
                    continue
                if edge is None:
                    self.drop(g)
                    continue
                nxt, slot = edge
                buf = buffers.setdefault(nxt, {})
                old = buf.get(slot)
                if old is None:
                    buf[slot] = g
                elif old.st is not None and old.st.refs == 1:
                    # InputBuffer::accumulate in place into the buffered gradient (its last holder)
                    self.drop(g)
                else:
                    res = self.new(old.elems, old.dtype)
                    self.drop(old)
                    self.drop(g)
                    buf[slot] = res
                deps[nxt] -= 1
                if deps[nxt] == 0:
                    heapq.heappush(ready, (-nxt.seq, tie, nxt))
                    tie += 1

    def _call(self, n: Node, grads: list[G | None]) -> list[G | None]:
        rec = self.rec
        holders = [s for s in n.saved if isinstance(s, Holder)]
        if holders:
            fr = holders[0].frame
            if not fr.done:
                self._recompute(fr)
        outs = BACKWARD[n.kind](self, n, grads)
        if holders:
            # the unpacked tensors were locals of the formula: gone when it returns
            for h in holders:
                rec.release_holder(h)
        # validate_outputs: a broadcast input gets its gradient summed back, a dtype cast back
        fixed: list[G | None] = []
        for i, g in enumerate(outs):
            if g is None or i >= len(n.inputs) or n.inputs[i][2] is None:
                fixed.append(g)
                continue
            elems, dtype, _ = n.inputs[i]
            if g.elems != elems:
                s = self.new(elems, g.dtype)
                self.drop(g)
                g = s
            if g.dtype != dtype:
                c = self.new(elems, dtype)
                self.drop(g)
                g = c
            fixed.append(g)
        for g in grads:
            self.drop(g)
        for s in n.saved:
            if isinstance(s, Storage):
                rec.unref(s)
        n.saved = []
        return fixed

    def _recompute(self, fr: Frame) -> None:
        rec = self.rec
        prev, prev_tensors, prev_cache = rec.recomputing, rec.recompute_tensors, rec.autocast_cache
        rec.recomputing, rec.recompute_tensors, rec.autocast_cache = fr, [], {}
        fr.packed = 0
        try:
            fr.recompute(rec)
        except StopRecompute:
            pass
        finally:
            # the recompute runs in an autocast region of its own (the forward's state, restored by
            # checkpoint): its cached casts go when it ends, and so do its locals
            rec.exit_autocast()
            rec.autocast_cache = prev_cache
            for t in rec.recompute_tensors:
                if t.refs > 0 and t.st is not None:
                    t.refs = 0
                    rec.unref(t.st)
            rec.recomputing, rec.recompute_tensors = prev, prev_tensors
            fr.done = True

    def _accumulate_grad(self, n: Node, g: G | None) -> None:
        if g is None:
            return
        owner = n.meta.get("leaf")
        if owner is not None:  # a non-parameter leaf: its .grad lives as long as the tensor
            if owner.grad is None:
                owner.grad = g
            else:
                self.drop(g)
            return
        old = self.rec.grads.get(n.key)
        if old is None:
            # AccumulateGrad steals the gradient: `.grad` is the same tensor, no copy
            self.rec.grads[n.key] = g
        else:
            # `.grad += new` in place (gradient accumulation): the new gradient is dropped
            self.drop(g)


# ---- formulas shared by many ops -------------------------------------------------------------
@formula("view")
def _view_backward(bw: Backward, n: Node, grads: list) -> list:
    """A view's backward (view, t, transpose, alias, unsqueeze, _unsafe_view of a contiguous
    gradient): the same storage, reshaped."""
    g = grads[0]
    return [bw.share(g, n.inputs[0][0]) if g is not None else None]


@formula("view_copy")
def _view_copy_backward(bw: Backward, n: Node, grads: list) -> list:
    """A reshape of a gradient whose layout does not allow a view: clone (then _unsafe_view)."""
    g = grads[0]
    return [bw.new(n.inputs[0][0], g.dtype) if g is not None else None]


@formula("pass")
def _pass_backward(bw: Backward, n: Node, grads: list) -> list:
    """Every input gets the gradient itself (add, a scalar add, sub's first operand)."""
    g = grads[0]
    return [bw.share(g) if (g is not None and inp[2] is not None) else None for inp in n.inputs]


@formula("elementwise")
def _elementwise_backward(bw: Backward, n: Node, grads: list) -> list:
    """One new tensor like the input, computed from the gradient (neg, silu_backward, a mean's
    expand-and-divide, log_softmax's backward...); `meta["temps"]` temporaries made before it and
    dropped after it (pow's self.pow(e - 1) and the multiplication by e)."""
    g = grads[0]
    if g is None or n.inputs[0][2] is None:
        return [None]
    elems, dtype = n.inputs[0][0], n.meta.get("dtype") or g.dtype
    temps = [bw.new(n.meta.get("temp_elems", elems), n.meta.get("temp_dtype", dtype))
             for _ in range(n.meta.get("temps", 0))]
    out = bw.new(elems, dtype)
    for t in reversed(temps):
        bw.drop(t)
    return [out] + [None] * (len(n.inputs) - 1)
