"""The aten ops a program dispatches, with their FLOPs and bytes: `OpRecorder` (imports torch).

`OpRecorder` is a TorchDispatchMode. Entered inside the dry-run tracker's stack (on top of the
DryRunTracker, over FakeTensorMode or real CPU tensors), it sees every op the tracker sees, in
the order the program dispatches them, after autograd and autocast: the forward's ops, the
backward's ops as the autograd engine runs them, the optimizer's, the casts autocast inserts.
CompositeImplicitAutograd ops (linear, matmul, scaled_dot_product_attention, reshape, item, ...)
never reach a dispatch mode: they arrive decomposed (t + mm, _scaled_dot_product_flash_attention_for_cpu,
view or _unsafe_view, _local_scalar_dense).

Per op (`OpRecord`): the overload name (`aten.mm.default`), its kind (`op_kind`), FLOPs, bytes read
and written, the dtype of its first tensor output (else of its first tensor input), the phase and
step it ran in, and the innermost module it ran under (the tracker's ModTracker, when there is one).

Three things differ from a plain "every op a dispatch mode sees", so that one program gives one
op list whatever the tensors (fake or real) and the list is the CUDA program's:
- prim.* ops (prim.device: FakeTensor answers `t.device` through dispatch) are metadata queries
  that reach a dispatch mode only for tensor subclasses: they are counted in
  `OpRecorder.metadata_queries`, not recorded;
- host-side ops: the CUDA program keeps foreach/for-loop AdamW's `step` counters on the host
  (torch's `_multi_tensor_adam`: `_foreach_add_(steps, torch.tensor(1.0, device="cpu"))` and one
  `.item()` per parameter for each bias correction); an op all of whose tensors are such host
  tensors gets the kind "host" (a CPU op in the CUDA run: no kernel, no synchronisation), see
  `host_step_counters`;
- host reads that the fake replay answers without dispatching them (transformers' mask checks,
  planner.backends.dryrun._patches.transformers_not_tracing) are recorded as the
  `_local_scalar_dense` the real program dispatches there (`answered_reads`).

FLOPs (`op_flops`):
- matmul: torch.utils.flop_counter's registered formula for the op (mm, addmm, bmm, baddbmm,
  _scaled_mm), called as FlopCounterMode calls it (shapes of the args and of the output); the ops
  it has no formula for: mv/addmv 2mn, dot/vdot 2n, _int_mm 2mnk, addbmm 2bmnk, _grouped_mm
  2 x out.numel() x K, linear 2 x out.numel() x in_features;
- attention: this project's convention, 4 x batch x heads x head_dim x (computed (query, key)
  pairs) for a forward, pairs = S_q x S_kv, or S(S+1)/2 when the kernel is causal (is_causal with
  S_q == S_kv); a backward is 2.5 x its forward: torch.utils.flop_counter's
  sdpa_backward_flop_count counts 5 matmuls (scores recomputed, grad scores, grad V, grad Q, grad
  K) of the forward's 2 (scores, scores @ V), as FlashAttention's backward runs them;
- every other kind: 0.

Bytes (`OpRecord.bytes_read` / `bytes_written`): read = the sum over the op's tensor inputs
(arguments, lists of tensors included) of numel x element size of each tensor as the op sees it
(a view counts its own elements, not its storage's; a tensor passed twice counts twice; an in-place
op's `self` is read, for copy_/fill_/zero_ too); written = the same sum over the distinct tensors it
returns and the arguments its schema marks as written (`Tensor(a!)`: in-place, `out=`, the
_foreach_*_ lists). Views read and write 0: they make metadata only. "other" ops read and write 0.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from planner.backends.measurement import OP_KINDS, OpSummary, OpTotals, PhaseOps

__all__ = ["OP_KINDS", "OpRecord", "OpRecorder", "answered_reads", "host_step_counters", "kind_counts", "op_flops",
           "op_kind", "summarize"]

MATMUL_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot", "_int_mm", "linear", "_scaled_mm",
    "_grouped_mm", "_scaled_grouped_mm",
})
ATTENTION_PREFIXES = ("_scaled_dot_product_", "_flash_attention_", "_efficient_attention_", "_cudnn_attention_")
# metadata-only ops whose schema does not say so: _unsafe_view's output is a view of its input,
# not annotated because autograd must not treat it as one (reshape of a fresh clone)
UNANNOTATED_VIEWS = frozenset({"_unsafe_view"})
# bookkeeping ops that run no kernel on any device
OTHER_NAMESPACES = frozenset({"profiler"})
# metadata queries that reach dispatch only for tensor subclasses (FakeTensor): not recorded
METADATA_NAMESPACES = frozenset({"prim"})
OTHER_OPS = frozenset({
    "_record_function_enter", "_record_function_enter_new", "_record_function_exit", "record_stream",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_assert_tensor_metadata", "is_same_size",
})


def _resolve(name: str):
    """'aten.mm.default' (str(OpOverload)) -> the OpOverload, or None."""
    parts = name.split(".")
    if len(parts) == 2:
        parts.append("default")
    if len(parts) != 3:
        return None
    ns, packet, overload = parts
    try:
        return getattr(getattr(getattr(torch.ops, ns), packet), overload)
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _static_kind(name: str) -> str:
    ns, _, rest = name.partition(".")
    packet = rest.partition(".")[0]
    if ns in OTHER_NAMESPACES or packet in OTHER_OPS:
        return "other"
    if packet.startswith("_foreach_"):
        return "foreach"
    if packet.startswith(ATTENTION_PREFIXES):
        return "attention"
    if packet in MATMUL_OPS:
        return "matmul"
    op = _resolve(name)
    tags = set(getattr(op, "tags", ()) or ())
    if packet == "_local_scalar_dense" or torch.Tag.data_dependent_output in tags:
        return "sync"
    if torch.Tag.dynamic_output_shape in tags and packet not in ("index", "repeat_interleave"):
        return "sync"
    if packet in UNANNOTATED_VIEWS or torch.Tag.inplace_view in tags:
        return "view"
    schema = getattr(op, "_schema", None)
    if schema is not None and schema.returns:
        # a view: an output aliases an input and the op writes nothing (in-place / out= ops write)
        aliased = [r.alias_info for r in schema.returns if r.alias_info is not None]
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        if aliased and not writes and not any(a.is_write for a in aliased):
            return "view"
    return "elementwise"


def op_kind(name: str, args: tuple | None = None, kwargs: dict | None = None) -> str:
    """The kind of an op, by its overload name as `str(func)` writes it ('aten.mm.default').

    The kinds (planner.backends.measurement.OP_KINDS), tried in this order:
    - "other": bookkeeping that runs no kernel on any device: the profiler namespace
      (record_function enter/exit), prim.* (not recorded by OpRecorder), sym_size/sym_stride/...,
      record_stream, _assert_tensor_metadata. Counted apart, never as kernels.
    - "foreach": every _foreach_* op (one multi-tensor kernel per chunk of the list on CUDA).
    - "attention": _scaled_dot_product_* (CPU flash, flash, efficient, cuDNN; forward and
      backward), _flash_attention_*, _efficient_attention_*, _cudnn_attention_*.
    - "matmul": mm, addmm, bmm, baddbmm, addbmm, addmv, mv, dot, vdot, _int_mm, _scaled_mm,
      _grouped_mm, _scaled_grouped_mm, linear (CompositeImplicit: it reaches dispatch as t + mm).
    - "sync": a device-to-host synchronisation on CUDA: _local_scalar_dense (`.item()`, `bool(t)`)
      and every op torch tags `data_dependent_output` (equal, allclose, item) or
      `dynamic_output_shape` (nonzero, masked_select, unique, bincount, ...: the host must read
      the output size), except index.Tensor (a sync only with a boolean index: pass `args`) and
      repeat_interleave.Tensor (not a sync when `output_size` is given: pass `kwargs`/`args`).
    - "view": metadata only, no kernel on a GPU. Decided from torch's own schema: an output
      aliases an input (`Tensor(a)`) and nothing is written (so not in-place and not out=), or the
      op is tagged `inplace_view` (t_, transpose_, squeeze_, as_strided_, detach_, resize_, set_);
      plus _unsafe_view, whose output is a view that its schema does not annotate. This covers
      view, t, transpose, permute, expand, unsqueeze, squeeze, slice, select, narrow, split,
      split_with_sizes, unbind, chunk, diagonal, detach, alias, as_strided, lift_fresh,
      _reshape_alias, view_as_real/complex, unfold, reshape/contiguous/to when they alias
      (CompositeImplicit: they reach dispatch as a view or as a copy).
    - "elementwise": everything else: pointwise ops, reductions, copies (_to_copy, copy_, clone),
      cat, embedding, softmax/log_softmax, nll_loss, index/gather/scatter, factories (empty, zeros,
      full, arange, randint), fill_/zero_, custom ops (bitsandbytes.*), ...
    One more kind depends on where the tensors live, not on the name: OpRecorder gives "host" to
    an op all of whose tensors the CUDA program keeps on the host (AdamW's step counters): a CPU
    op there, whatever its name (its `_local_scalar_dense` is then no synchronisation).
    """
    kind = _static_kind(name)
    if kind == "elementwise" and args is not None:
        packet = name.split(".")[1] if "." in name else name
        if packet == "index" and len(args) > 1:
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
                return "sync"
        elif packet == "repeat_interleave" and name.endswith(".Tensor"):
            size = (kwargs or {}).get("output_size", args[2] if len(args) > 2 else None)
            if size is None:
                return "sync"
    return kind


# -------------------------------------------------------------------------------------------
# FLOPs
# -------------------------------------------------------------------------------------------
def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _named(func, args: tuple, kwargs: dict) -> dict[str, Any]:
    out = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def attention_pairs(s_q: int, s_kv: int, causal: bool) -> int:
    """(query, key) pairs an attention kernel computes: all, or the causal triangle S(S+1)/2."""
    if causal and s_q == s_kv:
        return s_q * (s_q + 1) // 2
    return s_q * s_kv


# a backward's FLOPs over its forward's: torch.utils.flop_counter.sdpa_backward_flop_count does 5
# matmuls (scores recomputed, dScores = dO @ V^T, dV, dQ, dK) of the forward's 2 (Q @ K^T, P @ V)
ATTENTION_BACKWARD_FACTOR = 2.5


def _attention_flops(name: str, func, args: tuple, kwargs: dict, out) -> int:
    packet = name.split(".")[1]
    a = _named(func, args, kwargs)
    q, k = a.get("query"), a.get("key")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return 0
    causal = bool(a.get("is_causal", False)) or int(a.get("custom_mask_type", 0) or 0) != 0
    if q.dim() != 4:  # varlen (packed) flash / efficient kernels: torch's formula (no causal factor)
        from torch.utils.flop_counter import flop_registry

        f = flop_registry.get(func.overloadpacket)
        return int(f(*args, **kwargs, out_val=out)) if f is not None else 0
    if packet.startswith(("_flash_attention_", "_efficient_attention_")):
        b, s_q, h, d = _shape(q)  # these take (batch, seq, heads, head_dim)
        s_kv = int(k.shape[1])
    else:
        b, h, s_q, d = _shape(q)  # _scaled_dot_product_*: (batch, heads, seq, head_dim)
        s_kv = int(k.shape[2])
    fwd = 4 * b * h * d * attention_pairs(s_q, s_kv, causal)
    if "backward" in packet:
        return int(fwd * ATTENTION_BACKWARD_FACTOR)
    return fwd


def _matmul_flops(packet: str, func, args: tuple, kwargs: dict, out) -> int:
    from torch.utils.flop_counter import flop_registry

    f = flop_registry.get(func.overloadpacket)
    if f is not None:
        try:
            return int(f(*args, **kwargs, out_val=out))  # as FlopCounterMode._count_flops calls it
        except TypeError:
            # overloads the formula's signature does not fit (addmm.dtype / addmm.dtype_out, whose
            # out_dtype lands on out_shape): the leading tensor arguments are the shapes it needs
            lead = []
            for a in args:
                if not isinstance(a, torch.Tensor):
                    break
                lead.append(a)
            return int(f(*lead, out_val=out))
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    if packet in ("mv", "addmv"):
        m = tensors[-2]
        return 2 * m.shape[0] * m.shape[1]
    if packet in ("dot", "vdot"):
        return 2 * tensors[0].numel()
    if packet == "_int_mm":
        (m, kk), n = tensors[0].shape, tensors[1].shape[1]
        return 2 * m * n * kk
    if packet == "addbmm":
        b1, b2 = tensors[1], tensors[2]
        return 2 * b1.shape[0] * b1.shape[1] * b1.shape[2] * b2.shape[2]
    if packet in ("_grouped_mm", "_scaled_grouped_mm"):
        a, b = tensors[0], tensors[1]
        if a.dim() == 2 and b.dim() == 2:  # groups split K (weight gradients): every (m, n) sums all of K
            return 2 * a.shape[0] * a.shape[1] * b.shape[1]
        res = out if isinstance(out, torch.Tensor) else None
        return 2 * (res.numel() if res is not None else 0) * a.shape[-1]
    if packet == "linear":
        res = out if isinstance(out, torch.Tensor) else None
        return 2 * (res.numel() if res is not None else 0) * tensors[0].shape[-1]
    return 0


def op_flops(func, args: tuple, kwargs: dict | None = None, out: Any = None, kind: str | None = None) -> int:
    """FLOPs of one dispatched op (see the module's docstring); 0 for kinds other than matmul and attention."""
    kwargs = kwargs or {}
    name = str(func)
    kind = kind or op_kind(name, args, kwargs)
    if kind == "matmul":
        return _matmul_flops(name.split(".")[1], func, args, kwargs, out)
    if kind == "attention":
        return _attention_flops(name, func, args, kwargs, out)
    return 0


# -------------------------------------------------------------------------------------------
# the recorder
# -------------------------------------------------------------------------------------------
@dataclass(slots=True)
class OpRecord:
    name: str  # the overload, as str(func) writes it: 'aten.mm.default'
    kind: str
    flops: int
    bytes_read: int
    bytes_written: int
    dtype: str | None  # of the first tensor output, else of the first tensor input ('bfloat16')
    phase: str
    step: int
    module: str | None  # innermost module the op ran under (None without a module tracker)
    in_shapes: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@functools.cache
def _written_args(func) -> tuple[tuple[int, str], ...]:
    schema = getattr(func, "_schema", None)
    if schema is None:
        return ()
    return tuple((i, a.name) for i, a in enumerate(schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


class OpRecorder(TorchDispatchMode):
    """Records every aten op dispatched while active, as `OpRecord`s in `records`.

    phase: a callable giving the current phase name (the tracker's `phase`; default 'step');
    module: a callable giving the current module path or None (the tracker's ModTracker);
    host_tensors: a callable giving the tensors the CUDA program keeps on the host (default none;
    `host_step_counters(optimizers)`); the tensors `torch.tensor(...)` makes (lift_fresh) in a
    phase named '*optimizer*' are host tensors too (AdamW's `torch.tensor(1.0, device="cpu")`).
    `step` is set by the caller (run_tracked sets it to the step index before each step): every
    step is recorded, each record tagged with its step; `summary()` summarises one of them.

    Enter it after (on top of) the DryRunTracker and FakeTensorMode: it then sees every op the
    tracker sees (including the host reads the tracker answers on fake tensors without running
    them), and passes each op on unchanged. It keeps no strong reference to any tensor.
    """

    def __init__(self, phase: Callable[[], str] | None = None, module: Callable[[], str | None] | None = None,
                 host_tensors: Callable[[], Iterable[torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.step = 0
        self.metadata_queries = 0
        self._phase = phase or (lambda: "step")
        self._module = module
        self._host_tensors = host_tensors
        self._host_scalars: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._kinds: dict[Any, str] = {}
        self._names: dict[Any, str] = {}

    @classmethod
    def for_tracker(cls, tracker, host_tensors: Callable[[], Iterable[torch.Tensor]] | None = None) -> "OpRecorder":
        """A recorder reading the phase and the innermost module from a DryRunTracker."""
        return cls().attach(tracker, host_tensors)

    def attach(self, tracker, host_tensors: Callable[[], Iterable[torch.Tensor]] | None = None) -> "OpRecorder":
        """Read the phase and the innermost module from a DryRunTracker (its phase 'between_steps',
        which a step's first ops see before the step marks a phase, is 'setup', as in the first
        step), and the host tensors from `host_tensors`."""
        mt = tracker._mod_tracker

        def module() -> str | None:
            parents = mt.parents
            if not parents or parents == {"Global"}:
                return None
            return max(parents, key=lambda n: n.count("."))

        def phase() -> str:
            ph = str(tracker.phase)
            return "setup" if ph == "between_steps" else ph

        self._phase, self._module, self._host_tensors = phase, module, host_tensors
        return self

    def _is_host_op(self, phase: str, name: str, ins: list, outs: list) -> bool:
        if "optimizer" not in phase or not (ins or outs):
            return False
        if name == "aten.lift_fresh.default":  # torch.tensor(...) inside optimizer.step: a host scalar
            for t in outs:
                self._host_scalars[id(t)] = t
            return True
        host = {id(t) for t in self._host_tensors()} if self._host_tensors is not None else set()
        for t in (*ins, *outs):
            if id(t) not in host and self._host_scalars.get(id(t)) is not t:
                return False
        return True

    def record_read(self, dtype: torch.dtype = torch.bool) -> None:
        """Record a host read of a one-element tensor that was answered without dispatching it."""
        self._append("aten._local_scalar_dense.default", "sync", 0, dtype.itemsize,
                     0, _dtype_name(dtype), ((),), ())

    def _append(self, name, kind, flops, read, written, dtype, in_shapes, out_shapes, phase=None) -> None:
        self.records.append(OpRecord(
            name=name, kind=kind, flops=int(flops), bytes_read=read, bytes_written=written, dtype=dtype,
            phase=self._phase() if phase is None else phase, step=self.step,
            module=self._module() if self._module is not None else None,
            in_shapes=in_shapes, out_shapes=out_shapes,
        ))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = self._names.get(func)
        if name is None:
            name = self._names[func] = str(func)
        kind = self._kinds.get(func)
        if kind is None:
            ns = name.partition(".")[0]
            kind = "metadata" if ns in METADATA_NAMESPACES else _static_kind(name)
            if kind == "elementwise" and name.split(".")[1] in ("index", "repeat_interleave"):
                kind = ""  # depends on the arguments
            self._kinds[func] = kind
        if kind == "metadata":
            self.metadata_queries += 1
            return out
        if not kind:
            kind = op_kind(name, args, kwargs)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        first = outs[0] if outs else (ins[0] if ins else None)
        phase = self._phase()
        if self._is_host_op(phase, name, ins, outs):
            kind = "host"
        if kind in ("view", "other"):
            read = written = 0
        else:
            read = sum(_nbytes(t) for t in ins)
            seen = {id(t) for t in outs}
            written = sum(_nbytes(t) for t in outs)
            for i, arg_name in _written_args(func):
                v = args[i] if i < len(args) else kwargs.get(arg_name)
                for t in tree_leaves(v):
                    if isinstance(t, torch.Tensor) and id(t) not in seen:
                        seen.add(id(t))
                        written += _nbytes(t)
        flops = op_flops(func, args, kwargs, out, kind) if kind in ("matmul", "attention") else 0
        self._append(name, kind, flops, read, written, _dtype_name(first.dtype) if first is not None else None,
                     tuple(_shape(t) for t in ins), tuple(_shape(t) for t in outs), phase=phase)
        return out

    # ---- results -------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted({r.step for r in self.records})

    def step_records(self, step: int | None = None) -> list[OpRecord]:
        """The records of one step (default: the last recorded, the steady state)."""
        steps = self.steps()
        if not steps:
            return []
        step = steps[-1] if step is None else step
        return [r for r in self.records if r.step == step]

    def summary(self, step: int | None = None, notes: list[str] | None = None) -> OpSummary:
        return summarize(self.records, step=step, notes=notes)


def _add(ph: PhaseOps, r: OpRecord) -> None:
    t = ph.kinds.get(r.kind)
    if t is None:
        t = ph.kinds[r.kind] = OpTotals()
    t.count += 1
    t.flops += r.flops
    t.bytes_read += r.bytes_read
    t.bytes_written += r.bytes_written
    ph.ops[r.name] = ph.ops.get(r.name, 0) + 1


def summarize(records: list[OpRecord], step: int | None = None, notes: list[str] | None = None) -> OpSummary:
    """Per phase (in the order the step enters them) and over the step: count, FLOPs, bytes read
    and written per kind, and the op names with counts, of one step (default: the last recorded,
    the steady state; `per_step` gives every recorded step's totals per kind)."""
    steps = sorted({r.step for r in records})
    chosen = (steps[-1] if steps else 0) if step is None else step
    phases: dict[str, PhaseOps] = {}
    total = PhaseOps()
    per_step: dict[int, dict[str, OpTotals]] = {s: {} for s in steps}
    for r in records:
        ps = per_step[r.step]
        t = ps.get(r.kind)
        if t is None:
            t = ps[r.kind] = OpTotals()
        t.count += 1
        t.flops += r.flops
        t.bytes_read += r.bytes_read
        t.bytes_written += r.bytes_written
        if r.step != chosen:
            continue
        ph = phases.get(r.phase)
        if ph is None:
            ph = phases[r.phase] = PhaseOps()
        _add(ph, r)
        _add(total, r)
    for ph in (*phases.values(), total):
        ph.kinds = {k: ph.kinds[k] for k in OP_KINDS if k in ph.kinds}
        ph.ops = dict(sorted(ph.ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return OpSummary(step=chosen, steps=steps, phases=phases, total=total,
                     per_step=[per_step[s] for s in steps], notes=list(notes or []))


def host_step_counters(optimizers: Iterable[Any]) -> Callable[[], list[torch.Tensor]]:
    """The `step` tensors of torch optimizers that keep them on the host in a CUDA run: those of
    param groups that are neither fused nor capturable (torch.optim.adam: the foreach and for-loop
    AdamW; SGD has none). Evaluated when called: the states exist from the first step on."""
    opts = list(optimizers)

    def tensors() -> list[torch.Tensor]:
        out = []
        for opt in opts:
            groups = getattr(opt, "param_groups", ())
            state = getattr(opt, "state", {})
            for g in groups:
                if g.get("fused") or g.get("capturable"):
                    continue
                for p in g["params"]:
                    st = state.get(p)
                    step = st.get("step") if st else None
                    if isinstance(step, torch.Tensor):
                        out.append(step)
        return out

    return tensors


@contextlib.contextmanager
def answered_reads(recorder: OpRecorder) -> Iterator[None]:
    """The host reads a fake replay answers without dispatching them, recorded as the
    `_local_scalar_dense` the real program dispatches at the same point: transformers'
    `fast_all(mask)` and `find_packed_sequence_indices(position_ids)` (answered on fake tensors by
    planner.backends.dryrun._patches.transformers_not_tracing, which must be entered first). On
    real tensors the reads are dispatched and recorded as they happen."""
    from transformers import masking_utils as mu

    from planner.backends.dryrun._patches import _is_fake

    fast_all, find_packed = mu.fast_all, mu.find_packed_sequence_indices

    def fast_all_(tensor):
        out = fast_all(tensor)
        if out is True and _is_fake(tensor):  # the real program bool()s `tensor.sum() == numel`
            recorder.record_read(torch.bool)
        return out

    def find_packed_(position_ids):
        n = len(recorder.records)
        out = find_packed(position_ids)
        # the real program bool()s `(mask[:, -1] == 0).all()`; the fake replay's answer skips it
        if _is_fake(position_ids) and not any(r.kind == "sync" for r in recorder.records[n:]):
            recorder.record_read(torch.bool)
        return out

    mu.fast_all, mu.find_packed_sequence_indices = fast_all_, find_packed_
    try:
        yield
    finally:
        mu.fast_all, mu.find_packed_sequence_indices = fast_all, find_packed


def kind_counts(summary: OpSummary, phase: str | None = None) -> dict[str, int]:
    """{kind: count} of a phase of a summary (None: the whole step)."""
    ph = summary.total if phase is None else summary.phases.get(phase, PhaseOps())
    return {k: v.count for k, v in ph.kinds.items()}

