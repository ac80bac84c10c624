"""Time from the replayed program: every op priced by a device profile, host and device overlapped.

The memory replay (planner.engine.tape) also lists the aten ops the program dispatches, as `Op`s
with symbolic sizes (c + t*T + q*T*S, T = batch x seq tokens, S = seq). Here each is priced by a
`DeviceProfile` (planner.profiles):

    device(op) = launch_s + max(FLOPs / rate(FLOPs), bytes / memory_rate(bytes))   attention
    device(op) = launch_s + max(fixed + FLOPs / rate(FLOPs), bytes / memory_rate(bytes))   matmul
    device(op) = launch_s + bytes / memory_rate(bytes)                              elementwise, foreach
    device(op) = launch_s + fixed + bytes / its rate(bytes)                          a kernel the profile
                                                                                     measured (kernels)
    device(op) = 0                                                                  view, sync
    host(op)   = host.op_s (view: host.view_s), + host.module_s per nn.Module call of the stretch,
                 all times fixed_scale (a program runs them colder than the loops that measured them;
                 so does a kernel's fixed part), + the HostCosts item of each call the stretch lists
                 (layer_s, loss_s, ...)

rate: for a Linear layer's matmul (Op.layout and Op.dims = (K, N) set) where the profile has a shape
model of its layout and dtype (matmul_shapes), rate(M, K, N) with M = FLOPs / (2 K N) (a CPU's bf16
kernels run at rates set by K or by the weight's size, not by FLOPs: planner.profiles.MatmulShapes);
else the matmul curve of the op's dtype (and of its operands' layout, Op.layout, where the profile
measured one: a Linear's forward, grad input and grad weight matmuls); SDPA kernels the attention curve, their backward kernels
(`*_backward`) the attention_backward curve, or where the profile has a shape model of the kernel's
dtype and pass (attention_shapes: forward over a causal prefill, decode, backward) rate(M, K, N) with K its
head dim (Op.dims), N = S its key length and M = FLOPs / (2 K N) (a CPU's kernel runs 2x apart at equal
FLOPs from head dim 16 to 64, and a decode step's at a fraction of a prefill's rate). memory_rate: the memory curve, or memory_inplace for
an in-place op (aten name ending in `_`: no output allocated), of the op's dtype where the profile
has one (memory_by_dtype, memory_inplace_by_dtype). fixed: the profile's matmul_fixed_s of
the op's dtype (0 if none: a CPU's small bf16 matmuls cost tens of microseconds whatever their
FLOPs). A _foreach_* op over n tensors on a
profile with foreach_per_tensor (the CPU runs one kernel per tensor) costs n x launch_s + bytes /
memory_rate(bytes): n kernels, back to back over the list's whole footprint, stream its bytes at the
rate of that footprint, not of one tensor's (the sweep's rate at a tensor's size is that of operands
within the last-level cache; AdamW's lists over every parameter lie beyond it: priced per tensor, the
optimizer's _foreach_* ops of an sft fp32 step of llama 2 x 512 (26 MB of parameters) came to 1-1.2 ms
each against 2-4 ms measured in place and 21 ms for _foreach_sqrt's new tensors, 2026-12-07).

A step is a sequence of stretches (one decoder layer's forward, its backward, the loss, the optimizer
step...). On a synchronous device (the CPU) a stretch costs host + device. On an asynchronous one
(CUDA) the host issues ahead of the device: with host clock h and device clock d,

    d <- max(d + D_k, h + H_k);  h <- h + H_k          (stretch k: host H_k, device D_k)
    at a synchronisation (.item(), generate's stopping check, the step's end):  h <- max(h, d) + sync_s

so a host-bound stretch costs its host time and a device-bound one its device time, not their sum.
The split reported: compute_s = sum of D_k (the device busy), host_s = total - compute_s (host overhead
the device waited for).

Every op keeps its aten name, so the op list can be compared with what the dry run records from the
real program (planner.backends.dryrun.ops), kind by kind.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass

from planner.engine.tape import KINDS, Op, OpList
from planner.profiles import DTYPES, MATMUL_LAYOUTS, DeviceProfile, attention_pass

__all__ = ["KINDS", "Op", "OpList", "StretchCost", "Timing", "compose", "price"]

PRICED = ("matmul", "attention")


@dataclass(frozen=True)
class StretchCost:
    host_s: float
    device_s: float
    sync: bool = False


@dataclass(frozen=True)
class _Compiled:
    """An OpList prepared for pricing (built once per list: programs are cached per plan shape):
    the host-side counts, and the kernel ops merged by (kind, FLOPs, bytes, dtype)."""

    kernels: int  # ops that run a kernel (the host cost of the stretch's mode)
    host_ops: int  # ops on host tensors
    views: int  # views and bookkeeping
    syncs: int
    modules: int
    calls: tuple[tuple[str, float], ...]
    # (count, curve (None: memory-bound), memory curve, tensors, dtype, kernel name, fc, ft, fq, bc, bt, bq,
    #  a Linear layer's (K, N) or ())
    groups: tuple[tuple, ...]


_compiled: dict[int, tuple[OpList, _Compiled]] = {}


def _compile(ops: OpList) -> _Compiled:
    hit = _compiled.get(id(ops))
    if hit is not None and hit[0] is ops:
        return hit[1]
    kernels = host_ops = views = syncs = 0
    merged: dict[tuple, int] = {}
    for op in ops.ops:
        k, n = op.kind, op.count
        if k in ("view", "other"):
            views += n
        elif k == "sync":
            syncs += n
        elif k == "host":
            host_ops += n
        else:
            kernels += n
            curve = ("attention_backward" if op.name.endswith("_backward") else k) if k in PRICED else None
            if curve == "matmul" and op.layout:
                curve = ("matmul", op.layout)
            memory = "memory_inplace" if op.name.endswith("_") else "memory"
            # an elementwise kernel keeps its name: a profile may have measured its own cost (kernels)
            key = (curve, memory, op.tensors if k == "foreach" else 1, op.dtype, op.name if k == "elementwise" else "",
                   op.flops.c, op.flops.t, op.flops.q, op.bytes.c, op.bytes.t, op.bytes.q,
                   op.dims if curve is not None else ())
            merged[key] = merged.get(key, 0) + n
    c = _Compiled(kernels, host_ops, views, syncs, ops.modules, tuple(ops.calls.items()),
                  tuple((n, *key) for key, n in merged.items()))
    if len(_compiled) > 65536:
        _compiled.clear()
    _compiled[id(ops)] = (ops, c)
    return c


def _seconds_fn(curve):
    """size -> size / rate(size) for a RateCurve, as a closure over plain floats (RateCurve.rate's
    arithmetic without its attribute lookups: an estimate prices a few hundred ops)."""
    pts = curve.points
    sizes = [p[0] for p in pts]
    rates = [p[1] for p in pts]
    logs = [math.log(x) for x in sizes]
    lo, hi, r_lo, r_hi = sizes[0], sizes[-1], rates[0], rates[-1]

    def seconds(size: float) -> float:
        if size <= lo:
            return size / r_lo
        if size >= hi:
            return size / r_hi
        i = bisect.bisect_right(sizes, size)
        w = (math.log(size) - logs[i - 1]) / (logs[i] - logs[i - 1])
        return size / (rates[i - 1] + w * (rates[i] - rates[i - 1]))

    return seconds


_fns: dict[int, tuple[DeviceProfile, dict]] = {}


def _profile_fns(profile: DeviceProfile) -> dict:
    hit = _fns.get(id(profile))
    if hit is not None and hit[0] is profile:
        return hit[1]
    fns: dict = {"memory": _seconds_fn(profile.memory), "memory_inplace": _seconds_fn(profile.memory_curve(True))}
    for dtype in set(profile.matmul) | set(profile.attention) | {"fp32", "bf16", "fp16"}:
        fns[("memory", dtype)] = _seconds_fn(profile.memory_curve(False, dtype))
        fns[("memory_inplace", dtype)] = _seconds_fn(profile.memory_curve(True, dtype))
        fns[("matmul", dtype)] = _seconds_fn(profile.matmul_curve(dtype))
        for layout in MATMUL_LAYOUTS:
            fns[(("matmul", layout), dtype)] = _seconds_fn(profile.matmul_curve(dtype, layout))
        fns[("attention", dtype)] = _seconds_fn(profile.attention_curve(dtype))
        fns[("attention_backward", dtype)] = _seconds_fn(profile.attention_backward_curve(dtype))
        fns[("fixed", dtype)] = profile.matmul_fixed_s.get(dtype, 0.0) * profile.fixed_scale
    for dtype, models in profile.matmul_shapes.items():
        for layout, model in models.items():
            fns[("shape", layout, dtype)] = model
    for dtype, models in profile.attention_shapes.items():
        for ps, model in models.items():
            fns[("attention_shape", ps, dtype)] = model
    for key, kc in profile.kernels.items():
        name, _, dtype = key.rpartition(".")
        fns[("kernel", name, dtype)] = (kc.fixed_s * profile.fixed_scale,
                                        _seconds_fn(kc.rate) if kc.rate is not None else None)
    if len(_fns) > 64:
        _fns.clear()
    _fns[id(profile)] = (profile, fns)
    return fns


def price(ops: OpList, tokens: float, seq: float, profile: DeviceProfile, mode: str = "grad") -> StretchCost:
    """Host and device seconds of one stretch at T = tokens, S = seq (module doc); `mode`: nograd,
    grad (a forward autograd records) or backward, for the host cost of an op. A warm estimate
    prices nothing again: planner.engine.timing caches each phase's time per (program, numbers,
    profile), and programs are cached per plan shape."""
    c = _compile(ops)
    host = profile.host
    fs = profile.fixed_scale
    h = ((c.kernels * host.op_cost(mode) + c.host_ops * host.op_s + c.views * host.view_s + c.modules * host.module_s)
         * fs + c.syncs * host.sync_s + sum(n * getattr(host, name) for name, n in c.calls))
    fns = _profile_fns(profile)
    launch = profile.launch_s
    per_tensor = profile.foreach_per_tensor
    T, TS = float(tokens), float(tokens) * float(seq)
    d = 0.0
    for n, curve, memory, tensors, dtype, name, fc, ft, fq, bc, bt, bq, dims in c.groups:
        b = bc + bt * T + bq * TS
        kernels = tensors if tensors > 1 and per_tensor else 1  # one kernel per tensor of the list
        # an integer or bool kernel is measured under fp32's name and curve (the recorder's dtype of
        # an op without a floating-point tensor)
        own = fns.get(("kernel", name, dtype if dtype in DTYPES else "fp32")) if name else None
        if own is not None:  # fixed + bytes / its own rate (profiles.KernelCost)
            size = own[1] or fns.get((memory, dtype)) or fns.get((memory, "fp32")) or fns[memory]
            t = own[0] + (size(b) if b > 0 else 0.0)
        else:
            t = (fns.get((memory, dtype)) or fns[memory])(b) if b > 0 else 0.0
        if curve is not None:
            f = fc + ft * T + fq * TS
            if f > 0:
                if not dims:
                    shapes = None
                elif isinstance(curve, tuple):  # a Linear layer's matmul: M = FLOPs / (2 K N), rate(M, K, N)
                    shapes = fns.get(("shape", curve[1], dtype))
                else:  # an SDPA kernel: K its head dim, N its key length (the stretch's S)
                    shapes = fns.get(("attention_shape", attention_pass(curve == "attention_backward", dims[1]), dtype))
                    dims = (dims[0], seq)
                if shapes is not None:
                    tf = shapes.seconds(f, dims)
                else:
                    tf = fns[(curve, dtype)](f)
                if curve == "matmul" or isinstance(curve, tuple):  # (matmul, layout)
                    tf += fns[("fixed", dtype)]
                if tf > t:
                    t = tf
        d += n * (kernels * launch + t)
    return StretchCost(h, d)


@dataclass(frozen=True)
class Timing:
    """One program's time: total, device busy (compute_s), and the host overhead left exposed."""

    total_s: float
    compute_s: float
    host_exposed_s: float
    host_s: float


def compose(stretches: Iterable[StretchCost], asynchronous: bool, sync_s: float = 0.0,
            sync_at_end: bool = True) -> Timing:
    """The overlap of host and device over stretches in program order (module doc)."""
    h = d = busy = host_total = 0.0
    for s in stretches:
        busy += s.device_s
        host_total += s.host_s
        if not asynchronous:
            h += s.host_s + s.device_s
            d = h
            continue
        d = max(d + s.device_s, h + s.host_s)
        h += s.host_s
        if s.sync:
            h = max(h, d) + sync_s
            d = h
    total = max(h, d)
    if asynchronous and sync_at_end:
        total = max(h, d)
    return Timing(total, busy, max(total - busy, 0.0), host_total)
