"""Time from the replayed program: every op priced by a device profile, host and device overlapped.

The memory replay (planner.engine.tape) also lists the aten ops the program dispatches, as `Op`s
with symbolic sizes (c + t*T + q*T*S, T = batch x seq tokens, S = seq). Here each is priced by a
`DeviceProfile` (planner.profiles):

    device(op) = launch_s + max(FLOPs / matmul_rate(FLOPs), bytes / memory_rate(bytes))   matmul, attention
    device(op) = launch_s + bytes / memory_rate(bytes)                                     elementwise, foreach
    device(op) = 0                                                                         view, sync
    host(op)   = host.op_s (view: host.view_s), + host.module_s per nn.Module call of the stretch

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

from collections.abc import Iterable
from dataclasses import dataclass

from planner.engine.tape import KINDS, Op, OpList
from planner.profiles import DeviceProfile

__all__ = ["KINDS", "Op", "OpList", "StretchCost", "Timing", "compose", "price"]

PRICED = ("matmul", "attention")


@dataclass(frozen=True)
class StretchCost:
    host_s: float
    device_s: float
    sync: bool = False


def price(ops: OpList, tokens: float, seq: float, profile: DeviceProfile, mode: str = "grad") -> StretchCost:
    """Host and device seconds of one stretch at T = tokens, S = seq (module doc); `mode`: nograd,
    grad (a forward autograd records) or backward, for the host cost of an op."""
    host = profile.host
    launch = profile.launch_s
    mem = profile.memory
    op_s = host.op_cost(mode)
    h = ops.modules * host.module_s + sum(n * getattr(host, name) for name, n in ops.calls.items())
    d = 0.0
    for op in ops.ops:
        kind, n = op.kind, op.count
        if kind in ("view", "other"):
            h += n * host.view_s
            continue
        if kind == "sync":
            h += n * host.sync_s
            continue
        if kind == "host":  # an op on host tensors: dispatched, no kernel
            h += n * host.op_s
            continue
        h += n * op_s
        b = float(op.bytes.at(tokens, seq))
        t_mem = mem.seconds(b) if b > 0 else 0.0
        if kind in PRICED:
            f = float(op.flops.at(tokens, seq))
            curve = profile.attention_curve(op.dtype) if kind == "attention" else profile.matmul_curve(op.dtype)
            t = max(curve.seconds(f) if f > 0 else 0.0, t_mem)
        else:
            t = t_mem
        d += n * (launch + t)
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
