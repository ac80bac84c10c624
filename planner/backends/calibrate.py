"""`planner calibrate`: this machine's DeviceProfile from micro-benchmarks, or a profile's few free
parameters fitted to whole-step measurements.

Micro-benchmarks (`calibrate`), every figure a median over interleaved repeats (the cases of a sweep
take turns, round after round, so that a burst of load on a shared machine hits all of them alike),
with its spread ((max - min) / median) in `sources`:
- dispatch loops: a 1-element add (host.op_s), x.view(-1) and x.t() (host.view_s), a module whose
  forward returns its input called through __call__ vs its forward (host.module_s), .item()
  (host.sync_s); on CUDA the device time of a 1-element add behind a backlog (launch_s);
- dispatch under autograd: the same 1-element add and mul on a tensor that requires grad (host.grad_op_s),
  and the backward of chains of muls per aten op its backward dispatches (host.backward_op_s: the
  slope between two chain lengths), the rest of a backward() call at the shorter chain its fixed
  cost (host.backward_call_s);
- a matmul sweep over LLM-like shapes (M tokens, K and N hidden sizes and 4x hidden sizes), each shape
  in the three layouts of a Linear layer's matmuls: the forward F.linear(x[M,K], w[N,K]) and the two
  of its backward as autograd's mm backward calls them, grad[M,N].mm(w[N,K]) (grad input) and
  grad.t()[N,M].mm(x[M,K]) (grad weight); one curve per dtype from all three layouts' points (their
  medians by layout in `sources`); on the CPU more shapes spread over (log M, log K, log N) and the
  powers of 2 dividing K and N (`spread_shapes`), and per dtype and layout a shape model fitted to all
  of them (`fit_matmul_shapes`: planner.profiles.MatmulShapes, what prices a Linear layer's matmuls),
  and the Linear layers of the models named (`planner calibrate --model`: `layer_shapes`), each kept
  as its own measured offset on the model (MatmulShapes.measured);
- an SDPA sweep (is_causal=True; FLOPs 4*B*H*D*S(S+1)/2), and its backward over a subset of the shapes
  (torch.autograd.grad of a retained graph: the backward kernel alone, with its call and its counted
  ops' fixed prices taken off; FLOPs 2.5x the forward's, as the time model counts a backward SDPA
  kernel): the attention and attention_backward curves, and their time ratios in `sources`;
- a memory sweep into new tensors (an add, a clone, a cast, a broadcast mul, an activation, a
  transpose copy: the memory curve) interleaved with in-place ops (x.add_(y) fp32 and bf16,
  x.mul_(scalar): the memory_inplace curve; on the CPU a large new output costs fresh pages, an
  in-place op does not), bytes = read + written;
  every curve: points (size, achieved rate), binned (median rate in log-spaced size bins); on the CPU
  every case cycles through copies of its operands spanning COLD_BYTES (beyond L2), as a program's
  operands are rarely in L1/L2 when an op runs (on hot operands small ops ran up to 2.7x faster);
- foreach_per_tensor: True on the CPU (torch's _foreach_* ops fall back to one op per tensor there),
  False on CUDA; a _foreach_* op over n tensors is then priced as n launches + its bytes at the rate of
  its whole list's bytes (`Prices`);
- transformers' ForCausalLMLoss on tiny logits that require grad, less its counted ops priced under
  grad mode: the Python of one loss function call (host.loss_s);
- AdamW(foreach=True).step() + zero_grad(set_to_none=True) (what a training step calls) over many tiny
  tensors vs few, less the loop that gives them their gradients back and their counted aten ops as the
  time model prices them (foreach per tensor, the step counters' .item() as host ops): the per-tensor
  cost (host.optimizer_tensor_s, the slope) and the fixed cost per step (host.optimizer_step_s);
- a check: small modules' forwards timed, and predicted from the finished profile by counting their
  aten ops (a TorchDispatchMode) and module calls and pricing them as planner.profiles describes;
- the step fit (CPU, `fit_host_to_steps`): layer_s, model_s, module_s, generate_step_s,
  generate_call_s and backward_op_s fitted to whole steps of built-in tiny llama programs (no-grad
  forwards, sft steps, a LoRA step, two generate calls of 8 and 2 new tokens, which tell the per-step
  and the per-call cost apart) timed here and predicted by planner.engine.timing.step_time.

Consistency with the time model. An op is priced host (op_s or view_s, + module_s per module call)
plus device (launch_s + size / rate). On the CPU both run on one thread, so every rate is taken from
what remains of an op's measured time once the fixed prices of the ops it dispatches (counted the same
way) are taken off: the sum then predicts the op. On CUDA device times come from CUDA events around
ops queued behind a `torch.cuda._sleep` backlog (the device runs them back to back, whatever the
host's speed), host costs from the issuing loop's wall time while the device keeps up, and the fixed
part taken off a device time is launch_s. The host costs of calls (backward_call_s, loss_s,
optimizer_step_s) are what is left of a call once its counted ops are priced the way the engine's
programs price them (mode: grad_op_s in a forward, backward_op_s in a backward, op_s in step());
the SDPA backward's rate takes backward_call_s off on the CPU (on CUDA the call is host time,
outside the device clock). Calibration time: about 45 s full, a few seconds quick (CPU, 1 thread).

Fitting (`read_steps`, `fit_profile`): rows of a whole-step CSV (the format of
shared/reference/h200_measured_steps.csv), a predict function (planner.engine.timing.step_seconds in
the CLI; any function of (plan, model, profile, gpu) in tests), and dotted paths of the profile's
float fields; Levenberg-Marquardt from several starts, then Nelder-Mead from the best point, on the
sum of squared log residuals, parameters bounded above 0; all pure Python.

torch is imported inside the functions that measure, never at module import.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import datetime
import itertools
import math
import os
import platform
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import PlannerInputError, did_you_mean, one_line
from planner.profiles import (DTYPES, MATMUL_LAYOUTS, DeviceProfile, HostCosts, KernelCost, MatmulShapes, RateCurve,
                              attention_pass, hat_weights, pow2_part, shape_sizes)

DEVICES = ("cpu", "cuda")
Progress = Callable[[str, int, int], None]  # (stage, samples done, samples in all)


class CalibrationError(PlannerInputError):
    """A calibration that cannot run (unknown device, no GPU, no torch); one line."""


class StepsError(PlannerInputError):
    """A step-measurement CSV or a fit request that cannot be used; one line naming file, row, column."""


# ---- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    repeats: int  # interleaved rounds per case
    sample_s: float  # target seconds of one timed sample (a loop of n calls)
    max_calls: int  # most calls in one sample (CUDA: bounded by the launch queue)
    mm_tokens: tuple[int, ...]
    mm_hidden: tuple[int, ...]
    mm_max_dim: int
    mm_max_flops: float
    mm_cases: int  # shapes per dtype, spread over the FLOP range
    mm_dtypes: tuple[str, ...]
    mem_bytes: tuple[float, float]  # smallest and largest bytes moved
    mem_points: int  # sizes per op kind
    sdpa_shapes: tuple[tuple[int, int, int, int], ...]  # (batch, heads, seq, head_dim)
    sdpa_backward: tuple[tuple[int, int, int, int], ...]  # shapes (of sdpa_shapes) whose backward is timed too
    attn_dtypes: tuple[str, ...]
    opt_tensors: tuple[int, int]  # parameter tensors of the few- and the many-tensor AdamW
    dispatch_calls: int  # calls per sample in the dispatch loops (CPU)
    check_llama: bool  # time a tiny transformers LlamaDecoderLayer as well as the MLP
    autograd_chain: tuple[int, int] = (8, 64)  # lengths of the two chains whose backward is timed
    # the rate sweeps cycle each case through copies of its operands spanning this many bytes, so
    # that they come from beyond the L1/L2 caches as in a program (0: the same operands every call)
    cold_bytes: float = 0.0
    # the shape sweep (matmul_shapes): this many more shapes, spread over (log M, log K, log N) rather than
    # over FLOPs, K and N also among mm_narrow (LoRA ranks), each at most mm_shape_max_flops (0: none)
    mm_shape_cases: int = 0
    mm_narrow: tuple[int, ...] = ()
    mm_shape_max_flops: float = 0.0
    step_rounds: int = 5  # interleaved rounds over the calibration programs (the step fit)
    step_programs: str = "full"  # which built-in calibration programs: quick | full
    # Linear layers of the models to be priced ((in, out) pairs: `linear_layer_dims`): each timed at the
    # two largest mm_tokens within mm_shape_max_flops and kept as a measured offset of its shape model
    # (MatmulShapes.measured)
    mm_layer_dims: tuple[tuple[int, int], ...] = ()
    # the SDPA shape sweep (attention_shapes): per dtype this many prefill (causal) and decode (one query
    # row) shapes for the forward kernel and prefill shapes for the backward, spread over the shape model's
    # (log M, log K, log N), each at most attn_shape_max_flops forward FLOPs (the backward at a quarter)
    attn_shape_cases: tuple[int, int, int] = (0, 0, 0)  # (prefill, decode, backward)
    attn_shape_max_flops: float = 0.0


# CPU sweeps: operands cycled over 8 MiB (beyond this machine's 2 MiB L2, within its L3): an op
# timed on the same operands in a tight loop runs from L1/L2 and, at 4-256 kB, took 1.5-2.7x less
# than with cold operands, while a tiny llama step's ops took ~2x their hot-loop time in the program
COLD_BYTES = 8 * 2**20
MAX_COPIES = 4096


def copies_for(footprint_bytes: float, cold_bytes: float, room: int = MAX_COPIES) -> int:
    """How many copies of a case's operands (footprint_bytes) to cycle through: enough to span
    cold_bytes, at most `room` (what the pools hold) and MAX_COPIES; at least 1."""
    if cold_bytes <= 0 or footprint_bytes <= 0:
        return 1
    return max(1, min(MAX_COPIES, int(room), math.ceil(cold_bytes / footprint_bytes)))


def _cycle(fns: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable calling `fns` in turn (each call the next one)."""
    if len(fns) == 1:
        return fns[0]
    it = itertools.cycle(fns)
    return lambda: next(it)()


def settings(device: str, quick: bool) -> Settings:
    if device == "cuda":
        if quick:
            return Settings(repeats=3, sample_s=0.002, max_calls=200, mm_tokens=(1, 64, 1024, 4096),
                            mm_hidden=(256, 1024, 4096), mm_max_dim=16384, mm_max_flops=2e11, mm_cases=10,
                            mm_dtypes=("fp32", "bf16", "fp16"), mem_bytes=(4e3, 2.56e8), mem_points=6,
                            sdpa_shapes=((1, 8, 512, 64), (4, 16, 2048, 128)), sdpa_backward=((1, 8, 512, 64),),
                            attn_dtypes=("fp32", "bf16", "fp16"), opt_tensors=(16, 128), dispatch_calls=200,
                            check_llama=False)  # fmt: skip
        return Settings(repeats=7, sample_s=0.003, max_calls=200, mm_tokens=(1, 4, 16, 64, 256, 1024, 4096, 8192),
                        mm_hidden=(64, 128, 256, 512, 1024, 2048, 4096, 8192), mm_max_dim=16384, mm_max_flops=2.2e12,
                        mm_cases=48, mm_dtypes=("fp32", "bf16", "fp16"), mem_bytes=(4e3, 4e9), mem_points=18,
                        sdpa_shapes=((1, 8, 128, 64), (1, 16, 512, 64), (2, 16, 1024, 128), (4, 32, 2048, 128),
                                     (1, 32, 4096, 128), (8, 32, 4096, 128)),
                        sdpa_backward=((1, 8, 128, 64), (1, 16, 512, 64), (2, 16, 1024, 128), (4, 32, 2048, 128)),
                        attn_dtypes=("fp32", "bf16", "fp16"), opt_tensors=(16, 256),
                        dispatch_calls=200, check_llama=True)  # fmt: skip
    if quick:
        return Settings(repeats=3, sample_s=0.001, max_calls=20000, mm_tokens=(1, 16, 256), mm_hidden=(64, 256, 1024),
                        mm_max_dim=1024, mm_max_flops=6e7, mm_cases=8, mm_dtypes=("fp32", "bf16"),
                        mem_bytes=(4e3, 4e6), mem_points=4, sdpa_shapes=((1, 4, 64, 32), (1, 4, 256, 64)),
                        sdpa_backward=((1, 4, 64, 32), (1, 4, 256, 64)), attn_dtypes=("fp32", "bf16"),
                        opt_tensors=(8, 64), dispatch_calls=1000, check_llama=False, autograd_chain=(8, 32),
                        step_rounds=3, step_programs="quick", mm_shape_cases=12, mm_narrow=(8,),
                        mm_shape_max_flops=3e7, cold_bytes=COLD_BYTES, attn_shape_cases=(6, 6, 6),
                        attn_shape_max_flops=2e7)  # fmt: skip
    return Settings(repeats=9, sample_s=0.004, max_calls=100000, mm_tokens=(1, 4, 16, 64, 128, 256, 512, 1024, 4096),
                    mm_hidden=(64, 128, 256, 512, 1024, 2048, 4096), mm_max_dim=4096, mm_max_flops=2.5e9, mm_cases=24,
                    mm_dtypes=("fp32", "bf16"), mem_bytes=(4e3, 2.56e8), mem_points=12,
                    sdpa_shapes=((1, 4, 64, 16), (1, 4, 128, 32), (1, 4, 128, 64), (1, 8, 256, 32), (1, 8, 256, 64),
                                 (1, 8, 512, 64), (2, 8, 512, 64), (1, 8, 1024, 64), (1, 8, 512, 128), (1, 4, 2048, 64),
                                 (1, 16, 1024, 64)),
                    sdpa_backward=((1, 4, 64, 16), (1, 4, 128, 32), (1, 4, 128, 64), (1, 8, 256, 32), (1, 8, 256, 64),
                                   (1, 8, 512, 64), (1, 8, 1024, 64)),
                    attn_dtypes=("fp32", "bf16"), opt_tensors=(16, 256), dispatch_calls=5000,
                    check_llama=True, cold_bytes=COLD_BYTES, mm_shape_cases=48, mm_narrow=(8, 16, 32),
                    mm_shape_max_flops=4e8, attn_shape_cases=(32, 20, 16), attn_shape_max_flops=3e8)  # fmt: skip


def matmul_shapes(st: Settings) -> list[tuple[int, int, int]]:
    """(M, K, N) of the sweep: M tokens, (K, N) in (h, h), (h, 4h), (4h, h); at most mm_cases of them,
    spread evenly over log FLOPs (the FLOPs curves); then mm_shape_cases more for the shape model
    (`spread_shapes`), sorted by FLOPs."""
    pairs: set[tuple[int, int]] = set()
    for h in st.mm_hidden:
        for k, n in ((h, h), (h, 4 * h), (4 * h, h)):
            if k <= st.mm_max_dim and n <= st.mm_max_dim:
                pairs.add((k, n))
    shapes = sorted({(m, k, n) for m in st.mm_tokens for k, n in pairs if 2 * m * k * n <= st.mm_max_flops},
                    key=lambda s: (2 * s[0] * s[1] * s[2], s))  # fmt: skip
    chosen = _spread(shapes, st.mm_cases)
    if st.mm_shape_cases > 0:
        # hidden sizes, 4x, 1.5x and 1.25x them (rows strided by other than a power of 2: k2, n2), LoRA ranks
        dims = sorted({d for h in st.mm_hidden for d in (h, 4 * h, 3 * h // 2, 5 * h // 4) if d <= st.mm_max_dim}
                      | set(st.mm_narrow))
        grid = [(m, k, n) for m in st.mm_tokens for k in dims for n in dims if 2 * m * k * n <= st.mm_shape_max_flops]
        chosen += spread_shapes(grid, st.mm_shape_cases, chosen)
        chosen += layer_shapes(st)
    return sorted(set(chosen), key=lambda s: (2 * s[0] * s[1] * s[2], s))


def layer_shapes(st: Settings) -> list[tuple[int, int, int]]:
    """(M, K, N) of the named Linear layers (st.mm_layer_dims): each at the two largest of mm_tokens
    whose 2MKN is within mm_shape_max_flops (M = 1 where none is)."""
    out = []
    for k, n in st.mm_layer_dims:
        ms = [m for m in st.mm_tokens if 2 * m * k * n <= st.mm_shape_max_flops] or [1]
        out += [(m, k, n) for m in sorted(ms)[-2:]]
    return out


def linear_layer_dims(models: Iterable[Any]) -> tuple[tuple[int, int], ...]:
    """The (in_features, out_features) of the models' Linear layers (planner.models.ModelSpec): each
    decoder layer's and the LM head's, sorted, without repeats."""
    dims = set()
    for m in models:
        dims |= {(lin.in_features, lin.out_features) for lin in m.layer_linears}
        if getattr(m, "lm_head_params", 0) and m.vocab_size:
            dims.add((m.hidden_size, m.vocab_size))
    return tuple(sorted(dims))


def spread_shapes(grid: Sequence[tuple[int, int, int]], n: int,
                  taken: Sequence[tuple[int, int, int]] = ()) -> list[tuple[int, int, int]]:  # fmt: skip
    """n shapes of `grid` spread over (log M, log K, log N) and the log of the powers of 2 that divide K
    and N, so that each varies on its own (the shape model's terms): greedy max-min distance from those
    chosen and `taken`, the first the one farthest from `taken` (or the largest); ties to the fewer
    FLOPs (cheaper to time)."""
    def point(s: tuple[int, int, int]) -> tuple[float, ...]:
        return (math.log2(s[0]), math.log2(s[1]), math.log2(s[2]), 2 * math.log2(pow2_part(s[1])),
                2 * math.log2(pow2_part(s[2])))

    pts = [point(s) for s in taken]
    left = sorted(set(grid) - set(taken), key=lambda s: (s[0] * s[1] * s[2], s))
    out: list[tuple[int, int, int]] = []
    dist = [min((math.dist(point(s), p) for p in pts), default=math.inf) for s in left]
    while left and len(out) < n:
        if all(math.isinf(d) for d in dist):
            i = len(left) - 1
        else:
            i = max(range(len(left)), key=lambda j: (dist[j], -j))
        s = left.pop(i)
        dist.pop(i)
        out.append(s)
        p = point(s)
        dist = [min(d, math.dist(point(x), p)) for d, x in zip(dist, left)]
    return out


# the SDPA shape sweep's grid: batch, (heads, KV heads), head dims (transformers' models' 16-256 and
# sizes between), sequence (prefill) and cache (decode) lengths
ATTN_BATCHES = (1, 2, 4, 8)
ATTN_HEADS = ((4, 2), (8, 4), (16, 8))
ATTN_HEAD_DIMS = (16, 24, 32, 48, 64, 96, 128)
ATTN_PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
ATTN_DECODE_LENGTHS = (8, 32, 128, 512, 2048)


@dataclass(frozen=True)
class AttentionShape:
    """One SDPA call of the shape sweep, as a transformers model makes it: q (batch, heads, queries, dim)
    a transposed view of (batch, queries, heads, dim), k and v (batch, kv heads, keys, dim) contiguous at
    the KV-head count (enable_gqa); causal over queries = keys (prefill), or one query row over the
    cache (decode)."""

    batch: int
    heads: int
    kv_heads: int
    queries: int
    keys: int
    dim: int

    @property
    def causal(self) -> bool:
        return self.queries > 1

    @property
    def flops(self) -> float:
        """4 x dim per computed (query, key) pair (_sdpa_flops)."""
        pairs = _causal_pairs(self.queries, self.keys) if self.causal else self.queries * self.keys
        return 4.0 * self.batch * self.heads * self.dim * pairs

    def mkn(self, passes: float = 1.0) -> tuple[float, int, int]:
        """(M, K, N) of the shape model: K the head dim, N the key length, M = FLOPs / (2 K N) (`passes`:
        the backward's FLOPs are 2.5x the forward's)."""
        return passes * self.flops / (2.0 * self.dim * self.keys), self.dim, self.keys


def attention_shapes(st: Settings) -> tuple[list[AttentionShape], list[AttentionShape], list[AttentionShape]]:
    """(prefill, decode, backward) shapes of the SDPA sweep: st.attn_shape_cases of each, spread over the
    shape model's (log M, log K, log N) (`spread_shapes`), within attn_shape_max_flops forward FLOPs (a
    quarter of it for the backward: 2.5x the FLOPs at a CPU's bf16 backward's few GFLOP/s)."""
    prefill = [AttentionShape(b, h, kv, s, s, d) for b in ATTN_BATCHES for h, kv in ATTN_HEADS
               for s in ATTN_PREFILL_LENGTHS for d in ATTN_HEAD_DIMS]  # fmt: skip
    decode = [AttentionShape(b, h, kv, 1, s, d) for b in ATTN_BATCHES for h, kv in ATTN_HEADS
              for s in ATTN_DECODE_LENGTHS for d in ATTN_HEAD_DIMS]  # fmt: skip
    out = []
    for grid, n, cap in ((prefill, st.attn_shape_cases[0], st.attn_shape_max_flops),
                         (decode, st.attn_shape_cases[1], st.attn_shape_max_flops),
                         (prefill, st.attn_shape_cases[2], st.attn_shape_max_flops / 4)):
        # one call per shape-model point (the smallest batch x heads giving its M)
        by_point: dict[tuple[int, int, int], AttentionShape] = {}
        for a in sorted(grid, key=lambda a: (a.flops, a.heads, a.batch)):
            m, k, nn = a.mkn()
            if a.flops <= cap:
                by_point.setdefault((round(m), k, nn), a)
        picked = spread_shapes(list(by_point), n)
        out.append(sorted((by_point[p] for p in picked), key=lambda a: (a.flops, a.dim)))
    return out[0], out[1], out[2]


def memory_sizes(st: Settings) -> list[float]:
    lo, hi = st.mem_bytes
    n = st.mem_points
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [hi]


# The elementwise mix of a transformer's forward and backward, as (name, dtype, bytes moved per element
# of the input): an add into a new tensor, a copy, a cast, a broadcast multiply by a row (norm weights,
# biases), an activation (a transcendental per element) and a strided copy (a transpose made contiguous).
MEMORY_KINDS = (("add fp32", "fp32", 12), ("add bf16", "bf16", 6), ("clone fp32", "fp32", 8),
                ("cast fp32->bf16", "fp32", 6), ("mul by a row fp32", "fp32", 8), ("mul by a row bf16", "bf16", 4),
                ("silu fp32", "fp32", 8), ("silu bf16", "bf16", 4), ("transpose copy fp32", "fp32", 8))  # fmt: skip
ROW = 256  # the row length of the broadcast and transposed kinds
# in-place kinds (no output allocated: the optimizer's updates, gradient accumulation), priced by the
# memory_inplace curve: (name, dtype, bytes moved per element)
MEMORY_INPLACE_KINDS = (("add_ fp32", "fp32", 12), ("add_ bf16", "bf16", 6), ("mul_ by a scalar fp32", "fp32", 8))
# the matmul sweep times every shape (M, K, N) in the three layouts of a Linear layer's matmuls: the
# forward F.linear(x[M,K], w[N,K]) (t + mm), and the two of its backward, as autograd's mm backward
# calls them: grad input = grad[M,N].mm(w[N,K]), grad weight = grad.t()[N,M].mm(x[M,K])
# (planner.profiles.MATMUL_LAYOUTS: linear, grad_input, grad_weight)


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    if n <= 1:
        return [items[-1]]
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


# ---- the device check, before anything runs ---------------------------------------------------------
TORCH_HINT = "pip install torch==2.13.0 (the CPU build; or your CUDA build)"


def check_device(device: str) -> str:
    """The device name, or CalibrationError (one line): unknown device, torch missing, no GPU."""
    import importlib.util

    if device not in DEVICES:
        raise CalibrationError(f"device: unknown device '{device}'{did_you_mean(device, DEVICES) or ''} "
                               f"(choose from {', '.join(DEVICES)})")
    if importlib.util.find_spec("torch") is None:
        raise CalibrationError(f"calibrate measures with torch, which is not installed: {TORCH_HINT}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CalibrationError(f"device: cuda is not available here (torch {torch.__version__}: "
                                   "torch.cuda.is_available() is False); calibrate this machine with --device cpu")
    return device


# ---- timing ---------------------------------------------------------------------------------------
def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread_of(xs: Sequence[float]) -> float:
    m = _median(xs)
    return (max(xs) - min(xs)) / m if xs and m > 0 else 0.0


class _Clock:
    """Per-call seconds of a callable. CPU: the wall clock around a loop. CUDA: `device_s` from events
    around calls queued behind a `_sleep` backlog (device time, back to back), `host_s` the issuing
    loop's wall time (started with the device idle), `wall_s` issue + finish."""

    def __init__(self, torch: Any, device: str):
        self.torch = torch
        self.cuda = device == "cuda"
        self.cycles_per_s = 0.0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda._sleep(1000)  # warm-up
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            rates = []
            for _ in range(3):
                e0.record()
                torch.cuda._sleep(2_000_000)
                e1.record()
                e1.synchronize()
                rates.append(2_000_000 / (e0.elapsed_time(e1) / 1e3))
            self.cycles_per_s = _median(rates)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def host_s(self, fn: Callable[[], Any], n: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        self.sync()
        return (t1 - t0) / n

    def wall_s(self, fn: Callable[[], Any], n: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / n

    def device_s(self, fn: Callable[[], Any], n: int) -> float:
        if not self.cuda:
            return self.wall_s(fn, n)
        torch = self.torch
        backlog = min(0.2, 60e-6 * n + 200e-6)
        for _ in range(3):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            torch.cuda._sleep(int(self.cycles_per_s * backlog))
            t0 = time.perf_counter()
            e0.record()
            for _ in range(n):
                fn()
            e1.record()
            issued = time.perf_counter() - t0
            e1.synchronize()
            if issued < 0.8 * backlog or backlog >= 0.2:
                break
            backlog = min(0.2, 2 * issued + 200e-6)  # the host fell behind the backlog: queue more
        return e0.elapsed_time(e1) / 1e3 / n


@dataclass
class _Case:
    key: Any
    fn: Callable[[], Any]
    how: str = "device"  # device | host | wall
    n: int = 1
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return _median(self.samples)

    @property
    def spread(self) -> float:
        return _spread_of(self.samples)


class _Runner:
    def __init__(self, clock: _Clock, st: Settings, progress: Progress | None, total: int):
        self.clock, self.st, self.progress = clock, st, progress
        self.done, self.total = 0, max(total, 1)
        self.stage = ""

    def tick(self, k: int = 1) -> None:
        self.done += k
        if self.progress is not None:
            self.progress(self.stage, min(self.done, self.total), self.total)

    def time(self, c: _Case, n: int) -> float:
        how = {"device": self.clock.device_s, "host": self.clock.host_s, "wall": self.clock.wall_s}[c.how]
        return how(c.fn, n)

    def run(self, stage: str, cases: list[_Case], repeats: int | None = None) -> list[_Case]:
        """Pilot (warm-up, calls per sample), then `repeats` rounds over all cases, each round in
        another order (rotated; every other one reversed)."""
        self.stage = stage
        repeats = repeats or self.st.repeats
        for c in cases:
            c.fn()
            c.fn()
            n, t = 1, self.time(c, 1)
            while t * n < self.st.sample_s / 8 and n < self.st.max_calls:
                n = min(self.st.max_calls, n * 8)
                t = self.time(c, n)
            c.n = max(1, min(self.st.max_calls, round(self.st.sample_s / max(t, 1e-9))))
            self.tick()
        for r in range(repeats):
            k = r % len(cases) if cases else 0
            order = cases[k:] + cases[:k]
            for c in (order[::-1] if r % 2 else order):
                c.samples.append(self.time(c, c.n))
                self.tick()
        return cases


def planned_samples(st: Settings, device: str) -> int:
    """Samples the calibration takes (for the progress bar): (pilot + repeats) per case."""
    per = st.repeats + 1
    dispatch = 7 + (1 if device == "cuda" else 0)
    mm = len(matmul_shapes(st)) * len(MATMUL_LAYOUTS) * len(st.mm_dtypes)
    attn = (len(st.sdpa_shapes) + len(st.sdpa_backward) + sum(map(len, attention_shapes(st)))) * len(st.attn_dtypes)
    mem = len(memory_sizes(st)) * (len(MEMORY_KINDS) + len(MEMORY_INPLACE_KINDS))
    opt = 4
    loss = 2
    check = 1 + (2 if st.check_llama else 0)
    autograd = 6
    ckpt = 4
    kernels = 0 if device == "cuda" else KERNEL_ESTIMATE[1 if st.step_programs == "quick" else 0]
    return per * (dispatch + autograd + mm + attn + mem + loss + opt + check + ckpt + kernels)


# ---- counting and pricing ops ---------------------------------------------------------------------
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_int_mm"}
ATTENTION_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
                 "_efficient_attention_forward"}  # fmt: skip
# metadata-only or host-only ops whose schema does not say so (no alias annotation)
HOST_ONLY_OPS = {"_unsafe_view", "_reshape_alias", "lift_fresh", "alias", "detach", "empty", "empty_strided",
                 "empty_like", "new_empty", "new_empty_strided", "_record_function_enter",
                 "_record_function_enter_new", "_record_function_exit", "set_", "resize_", "sym_size",
                 "sym_stride", "sym_numel", "is_same_size", "_has_compatible_shallow_copy_type"}  # fmt: skip
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero"}
# kernels that touch a small part of an input: bytes as the engine's recipes count them (planner.engine
# heads.causal_lm, program.prologue_ops) rather than every input's size. nll_loss_forward reads one
# log-prob per row (and the target); nll_loss_backward writes the whole gradient (reading a row's
# target); embedding reads the rows it gathers (and the ids) and writes them.
GATHER_BYTES: dict[str, Callable[[tuple, Any], int]] = {
    "nll_loss_forward": lambda args, out: args[1].numel() * (args[0].element_size() + args[1].element_size()),
    "nll_loss_backward": lambda args, out: _nbytes(out),
    "embedding": lambda args, out: 2 * _nbytes(out) + _nbytes(args[1]),
}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Op:
    name: str
    kind: str  # matmul | attention | kernel | view | sync
    flops: float = 0.0
    bytes: float = 0.0
    dtype: str = "fp32"
    tensors: int = 1  # the tensors of a _foreach_* op's list (bytes: over all of them)
    layout: str = ""  # a 2-D mm's operand layout (planner.profiles.MATMUL_LAYOUTS; matmul_layout)
    # with a layout: the Linear layer's (K in, N out) (linear_dims); an SDPA kernel: (head dim, key length)
    dims: tuple[int, int] | tuple[()] = ()
    queries: int = 0  # an SDPA kernel's query rows per sequence and head


def matmul_layout(a: Any, b: Any) -> str:
    """The layout of mm(a, b) as a Linear layer's matmuls have them: b transposed (a column-major
    view: mm(x, w.t())) is `linear`, a transposed is `grad_weight` (mm(grad.t(), x)), both
    row-major `grad_input` (mm(grad, w)); "" for anything else (batched, vectors, other strides)."""
    if a.dim() != 2 or b.dim() != 2:
        return ""

    def transposed(t: Any) -> bool:
        return t.stride(0) == 1 and t.shape[0] > 1 and t.stride(1) >= t.shape[0]

    def rows(t: Any) -> bool:
        return t.stride(1) == 1 or t.shape[1] == 1

    if transposed(a) and rows(b):
        return "grad_weight"
    if rows(a) and transposed(b):
        return "linear"
    if rows(a) and rows(b):
        return "grad_input"
    return ""


def linear_dims(layout: str, a: Any, b: Any) -> tuple[int, int]:
    """The Linear layer's (K in, N out) of mm(a, b) in `layout`: linear mm(x[M,K], w.t()[K,N]), grad_input
    mm(grad[M,N], w[N,K]), grad_weight mm(grad.t()[N,M], x[M,K])."""
    if layout == "linear":
        return int(a.shape[1]), int(b.shape[1])
    if layout == "grad_input":
        return int(b.shape[1]), int(a.shape[1])
    return int(b.shape[1]), int(a.shape[0])


def _tensors(torch: Any, xs: Any) -> Iterable[Any]:
    if isinstance(xs, torch.Tensor):
        yield xs
    elif isinstance(xs, (list, tuple)):
        for x in xs:
            yield from _tensors(torch, x)
    elif isinstance(xs, dict):
        for x in xs.values():
            yield from _tensors(torch, x)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _causal_pairs(sq: int, skv: int) -> int:
    """Query-key pairs a causal (top-left aligned, as torch's is_causal) kernel computes."""
    if sq <= skv:
        return sq * (sq + 1) // 2
    return skv * (skv + 1) // 2 + (sq - skv) * skv


def _sdpa_flops(func: Any, args: tuple, kwargs: dict) -> tuple[float, tuple[int, int], int]:
    """An SDPA kernel's forward FLOPs (4 x dim per computed query-key pair), (head dim, key length) and
    query rows."""
    names = [a.name for a in func._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
    if q is None or k is None or v is None:
        q, k, v = args[0], args[1], args[2]
    b_h = q.numel() // (q.shape[-2] * q.shape[-1])
    sq, skv, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    pairs = _causal_pairs(sq, skv) if bound.get("is_causal") else sq * skv
    return 2.0 * b_h * pairs * (d + dv), (int(d), int(skv)), int(sq)


def classify(torch: Any, func: Any, args: tuple, kwargs: dict, out: Any) -> Op:
    """One aten op as the time model sees it: its kind, FLOPs, bytes read + written, dtype."""
    name = func.overloadpacket.__name__
    schema = func._schema
    dtype = "fp32"
    for t in _tensors(torch, (args, kwargs)):
        if t.is_floating_point():
            dtype = DTYPE_NAMES.get(str(t.dtype).removeprefix("torch."), "fp32")
            break
    if name in SYNC_OPS:
        return Op(name, "sync", dtype=dtype)
    if name in HOST_ONLY_OPS or any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return Op(name, "view", dtype=dtype)
    moved = sum(_nbytes(t) for t in _tensors(torch, (args, kwargs))) + sum(_nbytes(t) for t in _tensors(torch, out))
    if name in GATHER_BYTES:  # what the kernel touches, as the engine counts it (not its whole inputs)
        moved = GATHER_BYTES[name](args, out)
    if not any(True for _ in _tensors(torch, out)):  # an in-place op returning nothing (_foreach_mul_): it
        for a, arg in zip(schema.arguments, args):  # writes the arguments it mutates
            if a.alias_info is not None and a.alias_info.is_write:
                moved += sum(_nbytes(t) for t in _tensors(torch, arg))
    tensors = 1
    if name.startswith("_foreach_") or name.startswith("_fused_"):
        first = args[0] if args else None
        tensors = max(1, len(first)) if isinstance(first, (list, tuple)) else 1
    base = name.removesuffix("_backward")
    if base in ATTENTION_OPS:
        flops, dims, queries = _sdpa_flops(func, args, kwargs)
        return Op(name, "attention", flops * (2.5 if name.endswith("_backward") else 1.0), moved, dtype, dims=dims,
                  queries=queries)
    if name in MATMUL_OPS:
        outs = list(_tensors(torch, out))
        mats = [t for t in _tensors(torch, args) if t.dim() >= 1]
        a = mats[1] if name in ("addmm", "baddbmm", "addbmm", "addmv") and len(mats) > 2 else mats[0]
        k = a.shape[-1] if a.dim() else 1
        flops = 2.0 * (outs[0].numel() if outs else 1) * k
        if name == "addbmm":
            flops *= a.shape[0]
        layout = matmul_layout(a, mats[-1]) if name in ("mm", "addmm") and len(mats) >= 2 else ""
        dims = linear_dims(layout, a, mats[-1]) if layout else ()
        return Op(name, "matmul", flops, moved, dtype, layout=layout, dims=dims)
    return Op(name, "kernel", 0.0, moved, dtype, tensors)


def count_ops(torch: Any, fn: Callable[[], Any]) -> tuple[list[Op], int, Any]:
    """The aten ops `fn` dispatches (a TorchDispatchMode), the nn.Module calls it makes, its result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops: list[Op] = []

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            ops.append(classify(torch, func, args, kwargs, out))
            return out

    calls = [0]

    def hook(module: Any, inputs: Any) -> None:
        calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with _Counter():
            result = fn()
    finally:
        handle.remove()
    return ops, calls[0], result


@dataclass(frozen=True)
class Prices:
    """What the time model prices ops with (a DeviceProfile's figures, or those measured so far), as
    planner.engine.cost prices them: matmuls on the matmul curve (of their layout where measured), SDPA kernels on the attention
    curve and their backward kernels (`*_backward`) on attention_backward (a matmul's FLOPs / rate
    plus its dtype's matmul_fixed_s), bytes on the memory
    curve or, for an in-place op (name ending in `_`), memory_inplace; a _foreach_* op over n
    tensors on a `foreach_per_tensor` device as n kernels (n launches) streaming its bytes at the
    rate of all of them (its host cost once)."""

    op_s: float
    view_s: float
    module_s: float = 0.0
    sync_s: float = 0.0
    launch_s: float = 0.0
    asynchronous: bool = False
    matmul: dict[str, RateCurve] = field(default_factory=dict)
    attention: dict[str, RateCurve] = field(default_factory=dict)
    memory: RateCurve | None = None
    matmul_layouts: dict[str, dict[str, RateCurve]] = field(default_factory=dict)  # dtype -> layout -> curve
    matmul_shapes: dict[str, dict[str, MatmulShapes]] = field(default_factory=dict)  # dtype -> layout -> model
    kernels: dict[str, KernelCost] = field(default_factory=dict)  # the profile's: 'name.dtype' -> own cost
    fixed_scale: float = 1.0  # the profile's: on every per-op fixed cost (host, kernel fixed, matmul fixed)
    attention_backward: dict[str, RateCurve] = field(default_factory=dict)
    memory_inplace: RateCurve | None = None
    foreach_per_tensor: bool = False
    matmul_fixed: dict[str, float] = field(default_factory=dict)  # per dtype: the profile's matmul_fixed_s
    memory_by_dtype: dict[str, RateCurve] = field(default_factory=dict)  # the profile's, by the op's dtype
    memory_inplace_by_dtype: dict[str, RateCurve] = field(default_factory=dict)
    attention_shapes: dict[str, dict[str, MatmulShapes]] = field(default_factory=dict)  # dtype -> pass -> model

    @classmethod
    def of(cls, p: DeviceProfile) -> Prices:
        dtypes = ("fp32", "bf16", "fp16")
        return cls(op_s=p.host.op_s, view_s=p.host.view_s, module_s=p.host.module_s, sync_s=p.host.sync_s,
                   launch_s=p.launch_s, asynchronous=p.asynchronous, matmul=dict(p.matmul),
                   matmul_layouts={d: dict(cs) for d, cs in p.matmul_layouts.items()}, kernels=dict(p.kernels),
                   matmul_shapes={d: dict(ms) for d, ms in p.matmul_shapes.items()},
                   fixed_scale=p.fixed_scale,
                   attention={d: p.attention_curve(d) for d in dtypes}, memory=p.memory,
                   attention_backward={d: p.attention_backward_curve(d) for d in dtypes},
                   memory_inplace=p.memory_curve(True), foreach_per_tensor=p.foreach_per_tensor,
                   matmul_fixed=dict(p.matmul_fixed_s), memory_by_dtype=dict(p.memory_by_dtype),
                   memory_inplace_by_dtype=dict(p.memory_inplace_by_dtype),
                   attention_shapes={d: dict(ms) for d, ms in p.attention_shapes.items()})  # fmt: skip

    def _curve(self, table: dict[str, RateCurve], dtype: str) -> RateCurve | None:
        return table.get(dtype) or table.get("fp32") or next(iter(table.values()), None)

    def _compute_curve(self, op: Op) -> RateCurve | None:
        if op.kind == "matmul":
            by_layout = self.matmul_layouts.get(op.dtype, {}).get(op.layout) if op.layout else None
            return by_layout or self._curve(self.matmul, op.dtype)
        if op.name.endswith("_backward") and self.attention_backward:
            return self._curve(self.attention_backward, op.dtype)
        return self._curve(self.attention or self.matmul, op.dtype)

    def op(self, op: Op, sizes: bool = True) -> tuple[float, float]:
        """(host, device) seconds of one op; without `sizes`, only the fixed parts (no size / rate)."""
        fs = self.fixed_scale
        if op.kind == "view":
            return self.view_s * fs, 0.0
        if op.kind == "sync":
            return self.sync_s, 0.0
        kernels = op.tensors if self.foreach_per_tensor and op.tensors > 1 else 1
        device = self.launch_s
        fixed = self.matmul_fixed.get(op.dtype, 0.0) * fs if op.kind == "matmul" and op.flops > 0 else 0.0
        if not sizes:
            device += fixed
        else:
            if op.name.endswith("_"):
                memory = self.memory_inplace_by_dtype.get(op.dtype) or self.memory_inplace or self.memory
            else:
                memory = self.memory_by_dtype.get(op.dtype) or self.memory
            b = op.bytes  # a foreach op's kernels stream its whole list (planner.engine.cost)
            mem = b / memory.rate(b) if memory is not None and b > 0 else 0.0
            own = self.kernels.get(f"{op.name}.{op.dtype}") if op.kind == "kernel" else None
            if own is not None:
                mem = own.fixed_s * fs + (own.rate.seconds(b) if own.rate is not None else mem)
            if op.kind in ("matmul", "attention"):
                if op.kind == "matmul":
                    shapes = self.matmul_shapes.get(op.dtype, {}).get(op.layout) if op.layout and op.dims else None
                else:  # an SDPA kernel: (K, N) its head dim and key length
                    shapes = self.attention_shapes.get(op.dtype, {}).get(
                        attention_pass(op.name.endswith("_backward"), op.queries)) \
                        if op.dims else None
                if shapes is not None and op.flops > 0:  # M = FLOPs / (2 K N)
                    comp = shapes.seconds(op.flops, op.dims)
                else:
                    curve = self._compute_curve(op)
                    comp = op.flops / curve.rate(op.flops) if curve is not None and op.flops > 0 else 0.0
                device += max(fixed + comp, mem)
            else:
                device += mem
        return self.op_s * fs, device + (kernels - 1) * self.launch_s

    def total(self, ops: Sequence[Op], modules: int = 0, sizes: bool = True) -> tuple[float, float, float]:
        """(host, device, total) of a stretch between two syncs: host + device, or max of them (async)."""
        host = modules * self.module_s * self.fixed_scale
        device = 0.0
        for o in ops:
            h, d = self.op(o, sizes)
            host += h
            device += d
        return host, device, (max(host, device) if self.asynchronous else host + device)

    def fixed(self, ops: Sequence[Op]) -> float:
        """The part of a measured time that is not size / rate: CPU: host + launch; CUDA device time:
        launch_s per kernel."""
        host, device, _ = self.total(ops, sizes=False)
        return device if self.asynchronous else host + device


def _rate(size: float, seconds: float, fixed: float) -> float:
    """size / (seconds - fixed), the remainder kept >= 5% of the time (noise on tiny ops)."""
    return size / max(seconds - fixed, 0.05 * seconds, 1e-12)


def binned_curve(points: Iterable[tuple[float, float]], per_decade: int = 3) -> RateCurve:
    """Median rate in log-spaced size bins (`per_decade` a decade), at the bins' median sizes."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for size, rate in points:
        if size > 0 and rate > 0 and math.isfinite(size) and math.isfinite(rate):
            bins.setdefault(math.floor(math.log10(size) * per_decade + 1e-9), []).append((size, rate))
    pts: list[tuple[float, float]] = []
    for b in sorted(bins):
        sizes = [s for s, _ in bins[b]]
        size = float(math.exp(_median([math.log(s) for s in sizes])))
        if pts and size <= pts[-1][0]:
            continue
        pts.append((round(size, 6 - int(math.floor(math.log10(size)))), float(_median([r for _, r in bins[b]]))))
    if not pts:
        raise CalibrationError("calibrate: no usable measurement for a curve")
    # rounding must keep them strictly ascending
    out = [pts[0]]
    for s, r in pts[1:]:
        if s > out[-1][0]:
            out.append((s, r))
    return RateCurve(points=tuple(out))


def matmul_curve(raw: Sequence[tuple[float, float, float, float, float]], memory: RateCurve,
                 per_decade: int = 3) -> tuple[RateCurve, int]:  # fmt: skip
    """The matmul curve from (FLOPs, bytes, time, fixed, spread) per shape: FLOPs / (time - fixed), in
    log bins, from the shapes the memory term would not explain (bytes / memory rate under half the
    remainder): the time model prices a matmul at max(FLOPs / rate, bytes / memory rate), so a
    memory-bound shape (a GEMV at M = 1) is priced by its bytes. A bin holding only memory-bound
    shapes keeps them. Returns the curve and how many shapes it was taken from."""
    pts_all = [(f, _rate(f, t, fx), b / memory.rate(b) < 0.5 * max(t - fx, 0.05 * t)) for f, b, t, fx, _ in raw]
    bins: dict[int, list[tuple[float, float, bool]]] = {}
    for p in pts_all:
        bins.setdefault(math.floor(math.log10(p[0]) * per_decade + 1e-9), []).append(p)
    pts: list[tuple[float, float]] = []
    for b in bins.values():
        compute = [(f, r) for f, r, c in b if c]
        pts += compute or [(f, r) for f, r, _ in b]
    kept = sum(1 for *_, c in pts_all if c)
    return binned_curve(pts, per_decade), kept


# the shape model (planner.profiles.MatmulShapes): every term's points at the powers of 4 that span its
# sizes in the sweep; the candidate term sets (M, K and N, plus at most one operand's size, with or
# without the powers of 2 dividing K and N) and smoothings (the penalty on neighbouring offsets'
# squared differences, per shape fitted: where no shape sits between two points their offsets stay
# level); the pair kept is the one of least leave-one-out error (fit_matmul_shapes)
SHAPE_TERM_SETS = tuple(("m", "k", "n") + extra + aligned for extra in ((), ("mk",), ("kn",), ("mn",))
                        for aligned in ((), ("k2", "n2")))
SHAPE_SMOOTHINGS = (0.002, 0.005, 0.02)


def _hats(logs: Sequence[float], size: float) -> list[float]:
    """The piecewise-linear basis at log(size) (planner.profiles.hat_weights): the weights of its two
    neighbouring knots."""
    row = [0.0] * len(logs)
    if len(logs) == 1:
        row[0] = 1.0
        return row
    i, w = hat_weights(logs, size)
    row[i - 1] += 1.0 - w
    row[i] += w
    return row


def _fit_shapes_once(pts: Sequence[tuple[int, int, int, float, float]], terms: Sequence[str],
                     smoothing: float) -> MatmulShapes:  # fmt: skip
    """Weighted least squares on log(rate) of (M, K, N, rate, weight) points over the terms' bases."""
    import numpy as np

    per_point = [shape_sizes(m, k, n) for m, k, n, _, _ in pts]
    sizes: dict[str, list[float]] = {}
    for t in terms:
        vals = [ps[t] for ps in per_point]
        lo, hi = math.floor(math.log(min(vals), 4) + 1e-9), math.ceil(math.log(max(vals), 4) - 1e-9)
        sizes[t] = [4.0**i for i in range(lo, max(hi, lo + 1) + 1)]
    logs = {t: [math.log(x) for x in v] for t, v in sizes.items()}
    ncol = 1 + sum(len(v) for v in sizes.values())
    rows = [[1.0] + [h for t in terms for h in _hats(logs[t], ps[t])] for ps in per_point]
    w = np.sqrt(np.array([p[4] for p in pts]))
    a = np.array(rows) * w[:, None]
    y = np.log(np.array([p[3] for p in pts])) * w
    lam = math.sqrt(smoothing * len(pts))
    pen, off = [], 1
    for t in terms:
        for j in range(len(sizes[t]) - 1):
            r = np.zeros(ncol)
            r[off + j], r[off + j + 1] = -lam, lam
            pen.append(r)
        off += len(sizes[t])
    # a small pull of every offset toward 0: the terms and the intercept are otherwise determined only
    # up to constants that cancel (each term's basis row sums to 1)
    pen += [np.eye(ncol)[j] * 1e-3 for j in range(1, ncol)]
    coef, *_ = np.linalg.lstsq(np.vstack([a, np.array(pen)]), np.concatenate([y, np.zeros(len(pen))]), rcond=None)
    out, off, intercept = {}, 1, float(coef[0])
    for t in terms:
        vals = coef[off: off + len(sizes[t])]
        mean = float(vals.mean())  # each term centred, its mean into the intercept
        intercept += mean
        out[t] = tuple((x, float(v) - mean) for x, v in zip(sizes[t], vals))
        off += len(sizes[t])
    return MatmulShapes(log_rate=intercept, terms=out, points=len(pts), smoothing=smoothing)


def fit_matmul_shapes(points: Sequence[tuple[int, int, int, float, float]],
                      layers: Sequence[tuple[int, int]] = (), what: str = "matmul") -> MatmulShapes:  # fmt: skip
    """The MatmulShapes of timed shapes (M, K, N, seconds, fixed seconds): rate = 2MKN / (seconds -
    fixed) (`_rate`), weighted by the share of the time that is not fixed (at least 0.1); for every
    candidate (terms, smoothing) the leave-one-out errors of the times of the shapes at least half of
    whose time is not fixed, and the candidate of least mean |log error| fitted to all of them (`loo`:
    its median |error|). `layers`: (K, N) of named Linear layers among the points: each one's measured
    offset (MatmulShapes.measured), the weighted mean of log(measured rate / model rate) over its points.
    `what`: the kind of shape the error message names."""
    timed = [p for p in points if p[3] > 0 and math.isfinite(p[3])]
    pts = [(m, k, n, _rate(2.0 * m * k * n, t, fx), min(1.0, max(0.1, (t - fx) / t))) for m, k, n, t, fx in timed]
    if len(pts) < 6:
        raise CalibrationError(f"calibrate: {len(pts)} timed {what} shapes, the shape model needs at least 6")
    judged = [i for i, p in enumerate(pts) if p[4] >= 0.5] or list(range(len(pts)))
    best: tuple[float, tuple[str, ...], float] | None = None
    for terms in SHAPE_TERM_SETS:
        for sm in SHAPE_SMOOTHINGS:
            errs = []
            for i in judged:
                m, k, n, t, fx = timed[i]
                model = _fit_shapes_once(pts[:i] + pts[i + 1:], terms, sm)
                errs.append(math.log((fx + 2.0 * m * k * n / model.rate(m, k, n)) / t))
            # the mean |log error| (a term that fixes a few shapes far off counts; a median would not see it)
            e = sum(abs(x) for x in errs) / len(errs)
            if best is None or e < best[0] - 1e-12:
                best = (e, terms, sm, _median([abs(math.exp(x) - 1) for x in errs]))
    assert best is not None
    model = _fit_shapes_once(pts, best[1], best[2])
    residual = _median([abs(r / model.rate(m, k, n) - 1) for m, k, n, r, _ in pts])
    measured = {}
    for k, n in layers:
        own = [(math.log(r / model.rate(m, k, n)), w) for m, kk, nn, r, w in pts if (kk, nn) == (k, n)]
        if own:
            measured[f"{k}x{n}"] = round(sum(v * w for v, w in own) / sum(w for _, w in own), 6)
    return model.model_copy(update={"residual": round(residual, 6), "loo": round(best[3], 6), "measured": measured})


# ---- the calibration ------------------------------------------------------------------------------
@dataclass
class CheckResult:
    name: str
    measured_s: float
    predicted_s: float
    spread: float
    ops: int
    modules: int

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


@dataclass
class Calibration:
    profile: DeviceProfile
    checks: list[CheckResult]
    elapsed_s: float
    notes: dict[str, str] = field(default_factory=dict)
    step_fit: Any = None  # StepFit: the host costs fitted to the built-in calibration programs (CPU)


def calibrate(device: str = "cpu", quick: bool = False, progress: Progress | None = None,
              threads: int | None = None, steps: bool | None = None) -> DeviceProfile:
    """Measure this machine's DeviceProfile (see the module docstring). `threads`: torch's intra-op
    threads during the measurement (default: torch's own, what a program gets). `steps`: fit the
    host costs the micro-benchmarks cannot see to the built-in calibration programs (default: on
    the CPU, when transformers and peft are installed)."""
    return run_calibration(device, quick, progress, threads, steps).profile


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:.3g} us" if s < 1e-3 else f"{s * 1e3:.3g} ms"


def _fmt_param(path: str, v: float) -> str:
    """A fitted parameter's value: a factor (device_scale, dtype_scale.*) as a number, else seconds."""
    return f"{v:.3g}" if "scale" in path else _fmt_s(v)


def _fmt_rate(r: float, unit: str) -> str:
    return f"{r / 1e9:.3g} G{unit}/s"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def run_calibration(device: str = "cpu", quick: bool = False, progress: Progress | None = None,
                    threads: int | None = None, steps: bool | None = None,
                    layer_dims: Sequence[tuple[int, int]] = ()) -> Calibration:  # fmt: skip
    """The profile, the check's results and the time taken (what `planner calibrate` reports).
    `steps`: run the step fit (`fit_host_to_steps`) after the micro-benchmarks; None: on the CPU when
    transformers and peft are installed (on CUDA it does not run: its programs run on the CPU)."""
    check_device(device)
    if threads is not None and threads < 1:
        raise CalibrationError(f"threads: must be >= 1 (got {threads})")
    if steps and device != "cpu":
        raise CalibrationError("steps: the step fit times CPU programs; it applies to --device cpu only")
    missing = step_fit_available() if device == "cpu" else "the step fit times CPU programs"
    if steps and missing:
        raise CalibrationError(f"steps: the step fit runs transformers programs: {missing}")
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cal = _calibrate(torch, device, quick, progress, layer_dims)
        if steps is None and missing:
            cal.notes["step fit"] = f"not run ({missing}): layer_s, model_s and generate_step_s stay 0"
            cal.profile = cal.profile.model_copy(
                update={"sources": {**cal.profile.sources, "step fit": f"not run: {missing}"}})
        elif steps is not False and device == "cpu":
            st = settings(device, quick)
            started = time.perf_counter() - cal.elapsed_s
            cal.step_fit = fit_host_to_steps(cal.profile, rounds=st.step_rounds, which=st.step_programs,
                                             threads=None, progress=progress, params=step_fit_params(st.step_programs))  # fmt: skip
            cal.profile = cal.step_fit.profile
            cal.elapsed_s = time.perf_counter() - started
        return cal
    finally:
        torch.set_num_threads(old_threads)


def _calibrate(torch: Any, device: str, quick: bool, progress: Progress | None,
               layer_dims: Sequence[tuple[int, int]] = ()) -> Calibration:  # fmt: skip
    import torch.nn.functional as F

    start = time.perf_counter()
    st = settings(device, quick)
    if layer_dims and st.mm_shape_cases > 0:
        st = dataclasses.replace(st, mm_layer_dims=tuple(sorted({(int(k), int(n)) for k, n in layer_dims})))
    cuda = device == "cuda"
    dev = torch.device(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    clock = _Clock(torch, device)
    runner = _Runner(clock, st, progress, planned_samples(st, device))
    sources: dict[str, str] = {}
    notes: dict[str, str] = {}
    rounds = f"median of {st.repeats} interleaved rounds"
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(n: int, dtype: Any) -> Any:
        return (torch.randn(n, device=dev, generator=gen) * 0.5).to(dtypes[dtype] if isinstance(dtype, str) else dtype)

    prev_grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        # -- dispatch loops (their figures price the fixed part of every later case) --
        a, b = torch.ones(1, device=dev), torch.ones(1, device=dev)
        a2 = torch.ones(1, 1, device=dev)

        class _Nothing(torch.nn.Module):
            def forward(self, x: Any) -> Any:
                return x

        nothing = _Nothing()
        host = "host" if cuda else "wall"
        cases = [_Case("add", lambda: torch.add(a, b), host), _Case("view", lambda: a.view(-1), host),
                 _Case("t", lambda: a2.t(), host), _Case("module", lambda: nothing(a), host),
                 _Case("forward", lambda: nothing.forward(a), host), _Case("item", lambda: a.item(), host),
                 _Case("empty", lambda: None, host)]  # fmt: skip
        if cuda:
            cases.append(_Case("launch", lambda: torch.add(a, b), "device"))
        d = {c.key: c for c in runner.run("dispatch", cases)}
        launch_s = d["launch"].median if cuda else 0.0
        op_s = d["add"].median if cuda else max(d["add"].median - launch_s, 0.0)
        view_s = (d["view"].median + d["t"].median) / 2
        module_s = max(d["module"].median - d["forward"].median, 0.0)
        sync_s = d["item"].median
        how = "host time of the issuing loop, the device idle at its start" if cuda else "wall time of a loop"
        sources["host.op_s"] = (f"torch.add of two 1-element tensors: {_fmt_s(d['add'].median)} a call ({how}, "
                                f"{d['add'].n} calls a sample, {rounds}, spread {d['add'].spread:.0%})"
                                + ("" if cuda else " minus launch_s (0 on the CPU)")
                                + f"; a Python call of an empty lambda alone: {_fmt_s(d['empty'].median)}")
        sources["host.view_s"] = (f"mean of x.view(-1) ({_fmt_s(d['view'].median)}, spread {d['view'].spread:.0%}) and "
                                  f"x.t() ({_fmt_s(d['t'].median)}, spread {d['t'].spread:.0%}) a call ({how}, {rounds})")
        sources["host.module_s"] = (f"an nn.Module whose forward returns its input, called ({_fmt_s(d['module'].median)}) "
                                    f"minus its forward called directly ({_fmt_s(d['forward'].median)}) ({how}, {rounds}, "
                                    f"spreads {d['module'].spread:.0%}, {d['forward'].spread:.0%})")
        sources["host.sync_s"] = (f"x.item() on a 1-element {device} tensor ({how}, {rounds}, spread {d['item'].spread:.0%})")
        sources["launch_s"] = (f"device time of a 1-element add, from CUDA events around {d['launch'].n} adds queued "
                               f"behind a torch.cuda._sleep backlog ({rounds}, spread {d['launch'].spread:.0%})"
                               if cuda else "0 on the CPU: an op's fixed time is all host (host.op_s)")
        prices = Prices(op_s=op_s, view_s=view_s, module_s=module_s, sync_s=sync_s, launch_s=launch_s,
                        asynchronous=cuda)

        def fixed_of(fn: Callable[[], Any]) -> float:
            ops, _, _ = count_ops(torch, fn)
            return prices.fixed(ops)

        # -- autograd: a forward op that autograd records, an op the backward runs --
        grad_op_s, backward_op_s, backward_call_s, autograd_src = _autograd(torch, runner, st, dev, view_s, how, rounds)
        sources.update(autograd_src)

        # -- matmuls: every shape in a Linear layer's three layouts (MATMUL_LAYOUTS) --
        shapes = matmul_shapes(st)
        mm_raw: dict[str, list[tuple[float, float, float, float, float]]] = {}  # flops, bytes, time, fixed, spread
        mm_keys: dict[str, list[tuple[str, int, int, int]]] = {}  # (layout, M, K, N) of each mm_raw entry
        mm_fixed: dict[str, float] = {}
        for dt in st.mm_dtypes:
            elem = 4 if dt == "fp32" else 2
            cold = int(st.cold_bytes / 2 / elem)
            maxa = max(max(m * k for m, k, _ in shapes), cold)
            maxb = max(max(k * n for _, k, n in shapes), cold)
            maxc = max(max(m * n for m, _, n in shapes), cold)
            pool_a, pool_b, pool_c = randn(maxa, dt), randn(maxb, dt), randn(maxc, dt)

            def layout_fn(layout: str, m: int, k: int, n: int, j: int) -> Callable[[], Any]:
                def x() -> Any:
                    return pool_a[j * m * k: (j + 1) * m * k].view(m, k)

                def w() -> Any:
                    return pool_b[j * k * n: (j + 1) * k * n].view(n, k)

                def g() -> Any:
                    return pool_c[j * m * n: (j + 1) * m * n].view(m, n)

                if layout == "linear":
                    return lambda x=x(), w=w(): F.linear(x, w)
                if layout == "grad_input":
                    return lambda g=g(), w=w(): g.mm(w)
                return lambda g=g(), x=x(): g.t().mm(x)

            cases = []
            for layout in MATMUL_LAYOUTS:
                for m, k, n in shapes:
                    # the operands it reads: (x, w), (grad, w), (grad, x)
                    a_n, b_n = {"linear": (m * k, k * n), "grad_input": (m * n, k * n),
                                "grad_weight": (m * n, m * k)}[layout]  # fmt: skip
                    room = {"linear": min(maxa // (m * k), maxb // (k * n)),
                            "grad_input": min(maxc // (m * n), maxb // (k * n)),
                            "grad_weight": min(maxc // (m * n), maxa // (m * k))}[layout]  # fmt: skip
                    copies = copies_for((a_n + b_n) * elem, st.cold_bytes, room)
                    fns = [layout_fn(layout, m, k, n, j) for j in range(copies)]
                    cases.append(_Case((layout, m, k, n), _cycle(fns)))
            fixed = {layout: fixed_of(next(c.fn for c in cases if c.key[0] == layout)) for layout in MATMUL_LAYOUTS}
            runner.run(f"matmul {dt}", cases)
            size = pool_a.element_size()
            mm_raw[dt] = [(2.0 * m * k * n, float((m * k + n * k + m * n) * size), c.median, fixed[lay], c.spread)
                          for c in cases for lay, m, k, n in [c.key]]  # fmt: skip
            mm_keys[dt] = [c.key for c in cases]
            mm_fixed.update({f"{dt} {lay}": fx for lay, fx in fixed.items()})
            del pool_a, pool_b, pool_c, cases

        # -- attention: SDPA, causal; its backward (torch.autograd.grad of a retained graph) --
        attention: dict[str, RateCurve] = {}
        attention_backward: dict[str, RateCurve] = {}
        ratios: dict[str, list[tuple[Any, float]]] = {}
        # the fixed part of a backward call: the call itself (backward_call_s, host: not on CUDA's
        # device clock), its kernel-running ops at backward_op_s, views at view_s (CUDA: launch_s a kernel)
        bprices = Prices(op_s=backward_op_s, view_s=view_s, module_s=module_s, sync_s=sync_s, launch_s=launch_s,
                         asynchronous=cuda)
        bwd_call = 0.0 if cuda else backward_call_s
        for dt in st.attn_dtypes:
            elem = 4 if dt == "fp32" else 2
            cases, flops = [], []
            for bb, hh, ss, dd in st.sdpa_shapes:
                numel = bb * hh * ss * dd
                copies = min(64, copies_for(3 * numel * elem, st.cold_bytes))
                qkv = [tuple(randn(numel, dt).view(bb, hh, ss, dd) for _ in range(3)) for _ in range(copies)]
                cases.append(_Case((bb, hh, ss, dd), _cycle(
                    [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True) for q, k, v in qkv])))
                flops.append(4.0 * bb * hh * dd * ss * (ss + 1) / 2)
            bwd, bwd_ops = [], []
            for bb, hh, ss, dd in st.sdpa_backward:
                numel = bb * hh * ss * dd
                # q, k, v, the output's gradient, the saved output, and the three gradients made
                copies = min(64, copies_for(8 * numel * elem, st.cold_bytes))
                fns = []
                with torch.enable_grad():
                    for _ in range(copies):
                        ins = tuple(randn(numel, dt).view(bb, hh, ss, dd).requires_grad_(True) for _ in range(3))
                        g = randn(numel, dt).view(bb, hh, ss, dd)
                        o = F.scaled_dot_product_attention(*ins, is_causal=True)

                        def grads(o: Any = o, ins: Any = ins, g: Any = g) -> Any:
                            return torch.autograd.grad(o, ins, g, retain_graph=True)

                        fns.append(grads)
                    ops, _, _ = count_ops(torch, fns[0])
                bwd.append(_Case(("backward", (bb, hh, ss, dd)), _cycle(fns)))
                bwd_ops.append(ops)
            fixed = fixed_of(cases[0].fn)
            runner.run(f"attention {dt}", cases + bwd)
            pts = [(f, _rate(f, c.median, fixed)) for f, c in zip(flops, cases)]
            attention[dt] = binned_curve(pts)
            spreads = [c.spread for c in cases]
            sources[f"attention.{dt}"] = (
                f"F.scaled_dot_product_attention(q, k, v, is_causal=True) ({dt}) over (B, H, S, D) in "
                f"{', '.join(str(s) for s in st.sdpa_shapes)}; FLOPs 4*B*H*D*S(S+1)/2; rate = FLOPs / (time - "
                f"{_fmt_s(fixed)} fixed); {rounds}; spreads median {_median(spreads):.0%}, worst {max(spreads):.0%}")
            # the backward: FLOPs as the time model counts them (2.5x the forward's), over what is left of
            # the call once its fixed part is taken off (on the CPU it runs no kernel besides the attention's)
            bpts, bfixed, bkern = [], [], []
            for c, ops in zip(bwd, bwd_ops):
                att = [o for o in ops if o.kind == "attention"]
                fx = bwd_call + bprices.fixed(ops)
                f = sum(o.flops for o in att)
                bfixed.append(fx)
                bkern.append(", ".join(sorted({o.name for o in ops if o.kind != "view"})) or "none")
                bpts.append((f, _rate(f, c.median, fx)))
            fwd_of = dict(zip(st.sdpa_shapes, cases))
            ratios[dt] = [(c.key[1], c.median / fwd_of[c.key[1]].median) for c in bwd if c.key[1] in fwd_of]
            if bpts and all(f > 0 for f, _ in bpts):
                attention_backward[dt] = binned_curve(bpts)
                bsp = [c.spread for c in bwd]
                rates = ", ".join(f"{s} {_fmt_rate(r, 'FLOP')} ({_fmt_s(c.median)})"
                                  for s, (_, r), c in zip(st.sdpa_backward, bpts, bwd))  # fmt: skip
                sources[f"attention_backward.{dt}"] = (
                    f"torch.autograd.grad(o, (q, k, v), grad, retain_graph=True) of o = F.scaled_dot_product_attention("
                    f"q, k, v, is_causal=True) ({dt}, q, k, v requiring grad, under grad mode; its graphs kept and "
                    f"cycled over as the operands are) over (B, H, S, D) in "
                    f"{', '.join(str(s) for s in st.sdpa_backward)}; its kernels {'; '.join(sorted(set(bkern)))}; "
                    f"FLOPs 2.5x the forward's (as the time model counts a backward SDPA kernel); rate = FLOPs / (time - fixed), fixed {_fmt_s(min(bfixed))}"
                    + (f"..{_fmt_s(max(bfixed))}" if max(bfixed) > min(bfixed) else "") + ": "
                    + ("its ops' launch_s (device time)" if cuda else
                       f"the backward call (host.backward_call_s {_fmt_s(backward_call_s)}) and its counted ops "
                       "(kernels at backward_op_s, views at view_s)")
                    + f"; {rounds}; spreads median {_median(bsp):.0%}, worst {max(bsp):.0%}; by shape: {rates}")
            elif bkern:
                sources[f"attention_backward.{dt}"] = (f"not measured: the backward of SDPA ({dt}) ran no attention "
                                                       f"kernel the time model counts (its ops: {bkern[0]})")
            else:
                sources[f"attention_backward.{dt}"] = "not measured: no backward shapes in these settings"
            del cases, bwd
        # -- the SDPA shape models: rate against (M query rows, K head dim, N key length), per dtype and pass --
        attention_shapes_: dict[str, dict[str, MatmulShapes]] = {}
        if not cuda and any(st.attn_shape_cases):
            attention_shapes_, sources["attention_shapes"] = _attention_shape_models(
                torch, runner, st, randn, fixed_of, bprices, bwd_call, rounds)
        else:
            sources["attention_shapes"] = ("not measured: " + ("CUDA's SDPA is priced by its FLOPs curves" if cuda
                                           else "no shape sweep in these settings"))
        sources["attention.backward"] = (
            "backward / forward time of causal SDPA (the backward: torch.autograd.grad of the retained output, the "
            "forward: under no_grad), " + "; ".join(
                f"{dt}: " + ", ".join(f"{r:.2f} at {s}" for s, r in rs) for dt, rs in ratios.items() if rs)
            + "; the backward kernels are priced by the attention_backward curves")  # fmt: skip
        notes["attention backward/forward"] = ", ".join(f"{dt} {_median([r for _, r in rs]):.2f}"
                                                        for dt, rs in ratios.items() if rs)  # fmt: skip

        sources["operands"] = (
            f"matmul, attention and memory sweeps: each case cycles through copies of its operands spanning "
            f"{st.cold_bytes / 2**20:.0f} MiB (at most {MAX_COPIES} copies; attention 64), so that they come from beyond "
            "the L1/L2 caches as a program's operands mostly do" if st.cold_bytes > 0 else
            "matmul, attention and memory sweeps: the same operands every call (hot in the caches)")
        # -- memory-bound ops: into new tensors (memory), and in place (memory_inplace) --
        sizes = memory_sizes(st)
        kinds = MEMORY_KINDS + MEMORY_INPLACE_KINDS
        need = {"fp32": ROW, "bf16": ROW}
        for _, dt, per in kinds:
            need[dt] = max(need[dt], int(sizes[-1] / per) + ROW, int(st.cold_bytes / per) + ROW)
        pools = {dt: (randn(n, dt), randn(n, dt)) for dt, n in need.items()}
        rows = {dt: randn(ROW, dt) for dt in need}

        def elementwise(kind: str, x: Any, y: Any, row: Any) -> Callable[[], Any]:
            if kind.startswith("add_"):
                return lambda: x.add_(y)
            if kind.startswith("mul_"):
                return lambda: x.mul_(-1.0)  # the values keep their magnitude (no denormals)
            if kind.startswith("add"):
                return lambda: torch.add(x, y)
            if kind.startswith("clone"):
                return lambda: x.clone()
            if kind.startswith("cast"):
                return lambda: x.to(torch.bfloat16)
            if kind.startswith("silu"):
                return lambda: F.silu(x)
            x2 = x.view(-1, ROW)
            if kind.startswith("mul by a row"):
                return lambda: x2 * row
            assert kind.startswith("transpose copy"), kind
            return lambda: x2.t().contiguous()

        cases, moved, fixed = [], [], []
        for kind, dt, per in kinds:
            for size in sizes:
                n = max(ROW, int(size / per) // ROW * ROW)
                copies = copies_for(n * per, st.cold_bytes, need[dt] // n)
                fn = _cycle([elementwise(kind, pools[dt][0][j * n: (j + 1) * n], pools[dt][1][j * n: (j + 1) * n],
                                         rows[dt]) for j in range(copies)])  # fmt: skip
                cases.append(_Case((kind, n), fn))
                moved.append(float(n * per))
                fixed.append(fixed_of(fn))
        runner.run("memory", cases)  # both sets interleaved: the same conditions for both curves
        inplace_kinds = {k for k, *_ in MEMORY_INPLACE_KINDS}
        kind_dtype = {k: dt for k, dt, _ in kinds}
        all_pts = [(m, _rate(m, c.median, fx)) for m, c, fx in zip(moved, cases, fixed)]
        curves: dict[bool, RateCurve] = {}
        for inplace in (False, True):
            sel = [(pt, c, fx) for pt, c, fx in zip(all_pts, cases, fixed) if (c.key[0] in inplace_kinds) == inplace]
            pts = [pt for pt, _, _ in sel]
            curves[inplace] = binned_curve(pts)
            spreads = [c.spread for _, c, _ in sel]
            names = [k for k, *_ in (MEMORY_INPLACE_KINDS if inplace else MEMORY_KINDS)]
            by_kind = {k: _median([r for (m, r), c, _ in sel if c.key[0] == k and m >= 1e6] or [math.nan])
                       for k in names}  # fmt: skip
            fxs = [fx for *_, fx in sel]
            how_kind = "in place: x.add_(y), x.mul_(-1.0), no output allocated" if inplace else "into new tensors"
            sources["memory_inplace" if inplace else "memory"] = (
                f"{', '.join(names)} ({how_kind}; rows of {ROW}) on {len(sizes)} sizes each, {min(m for (m, _), _, _ in sel):.3g}.."
                f"{max(m for (m, _), _, _ in sel):.3g} bytes moved (read + written); rate = bytes / (time - its ops' "
                f"fixed prices, {_fmt_s(min(fxs))}..{_fmt_s(max(fxs))}); {rounds}, interleaved with the "
                f"{'new-output' if inplace else 'in-place'} kinds; spreads median {_median(spreads):.0%}, worst "
                f"{max(spreads):.0%}; curve: median rate of all kinds in 3 bins a decade; median rate from 1 MB up by "
                f"kind: " + ", ".join(f"{k} {_fmt_rate(r, 'B')}" for k, r in by_kind.items() if math.isfinite(r)))
        memory, memory_inplace = curves[False], curves[True]
        # the same points by the kinds' dtype: on the CPU a bf16 kind moves bytes at about half an fp32
        # one's rate (it converts every element), so one curve over both over-prices fp32 ops and
        # under-prices bf16 ones
        by_dtype: dict[bool, dict[str, RateCurve]] = {False: {}, True: {}}
        for inplace in (False, True):
            for dt in sorted({d for _, d, _ in kinds}):
                pts = [pt for pt, c in zip(all_pts, cases) if (c.key[0] in inplace_kinds) == inplace
                       and kind_dtype[c.key[0]] == dt]
                if pts:
                    by_dtype[inplace][dt] = binned_curve(pts)
        memory_by_dtype, memory_inplace_by_dtype = by_dtype[False], by_dtype[True]
        for inplace, field_name in ((False, "memory_by_dtype"), (True, "memory_inplace_by_dtype")):
            names = [k for k, *_ in (MEMORY_INPLACE_KINDS if inplace else MEMORY_KINDS)]
            sources[field_name] = (
                f"the {'memory_inplace' if inplace else 'memory'} sweep's points by the kind's (input) dtype: "
                + "; ".join(f"{dt}: {', '.join(k for k in names if kind_dtype[k] == dt)}, "
                            f"{_fmt_rate(c.rate(1e6), 'B')} at 1 MB" for dt, c in by_dtype[inplace].items()))
        big = max(sizes)
        sources["memory_inplace"] += (f"; at {big:.3g} bytes: in place {_fmt_rate(memory_inplace.rate(big), 'B')}, "
                                      f"into new tensors {_fmt_rate(memory.rate(big), 'B')}")
        del pools, cases

        # -- the matmul curves, now that the memory curve prices a shape's bytes --
        matmul: dict[str, RateCurve] = {}
        matmul_layouts: dict[str, dict[str, RateCurve]] = {}
        for dt, raw in mm_raw.items():
            matmul[dt], kept = matmul_curve(raw, memory_by_dtype.get(dt, memory))
            # the same per layout: the engine tags a Linear's three matmuls (planner.engine.ops.matmul_ops)
            matmul_layouts[dt] = {lay: matmul_curve([r for r, key in zip(raw, mm_keys[dt]) if key[0] == lay],
                                                    memory_by_dtype.get(dt, memory))[0] for lay in MATMUL_LAYOUTS}
            spreads = [r[4] for r in raw]
            best = max(_rate(f, t, fx) for f, _, t, fx, _ in raw)
            # per layout: the median rate of its shapes from 1e7 FLOPs up, and its time against the
            # forward layout's, shape by shape
            rate_of = {key: _rate(f, t, fx) for key, (f, _, t, fx, _) in zip(mm_keys[dt], raw)}
            big = 1e7 if any(r[0] >= 1e7 for r in raw) else 0.0
            layout_notes = []
            for lay in MATMUL_LAYOUTS:
                rs = [r for (ly, m, k, n), r in rate_of.items() if ly == lay and 2 * m * k * n >= big]
                vs = [rate_of[("linear", m, k, n)] / r for (ly, m, k, n), r in rate_of.items()
                      if ly == lay and 2 * m * k * n >= big and ("linear", m, k, n) in rate_of]  # fmt: skip
                layout_notes.append(f"{lay} {_fmt_rate(_median(rs), 'FLOP')}"
                                    + (f" (time {_median(vs):.2f}x the forward's)" if lay != "linear" else ""))
            sources[f"matmul.{dt}"] = (
                f"{len(shapes)} shapes ({dt}), M in {min(s[0] for s in shapes)}..{max(s[0] for s in shapes)}, K and N "
                f"in {min(min(s[1], s[2]) for s in shapes)}..{max(max(s[1], s[2]) for s in shapes)} "
                f"({raw[0][0]:.3g}..{max(r[0] for r in raw):.3g} FLOPs), each in the three layouts of a Linear layer: "
                f"F.linear(x[M,K], w[N,K]) (forward), grad[M,N].mm(w[N,K]) (grad input), grad.t()[N,M].mm(x[M,K]) "
                f"(grad weight); rate = 2MKN / (time - fixed: "
                + ("launch_s, of device time" if cuda else
                   ", ".join(f"{lay} {_fmt_s(mm_fixed[f'{dt} {lay}'])}" for lay in MATMUL_LAYOUTS)
                   + ": their t and mm priced at view_s and op_s")
                + f"); {rounds}; median of the cases' spreads {_median(spreads):.0%}, worst {max(spreads):.0%}; median "
                f"rate by layout{' from 1e7 FLOPs up' if big else ''}: {', '.join(layout_notes)}; curves (matmul_layouts.{dt}: "
                f"one per layout; matmul.{dt}: all layouts, for a matmul of no Linear layout): median rate "
                f"in 3 bins a decade, of the {kept} cases whose bytes / memory rate is under half their "
                f"time (the {len(raw) - kept} others are memory-bound, priced by the memory term; a bin of only such "
                f"cases keeps them); best case {_fmt_rate(best, 'FLOP')}")  # fmt: skip
        # -- the shape models: rate against the Linear layer's (M, K, N), per dtype and layout --
        matmul_shapes_: dict[str, dict[str, MatmulShapes]] = {}
        if st.mm_shape_cases > 0:
            for dt, raw in mm_raw.items():
                models = {}
                for lay in MATMUL_LAYOUTS:
                    models[lay] = fit_matmul_shapes([(m, k, n, t, fx) for (_, _, t, fx, _), (ly, m, k, n)
                                                     in zip(raw, mm_keys[dt]) if ly == lay], st.mm_layer_dims)  # fmt: skip
                matmul_shapes_[dt] = models
                sources[f"matmul_shapes.{dt}"] = (
                    f"fitted to the same {len(shapes)} shapes per layout (log rate = intercept + the sum of its terms' "
                    f"piecewise-linear offsets; terms from {' | '.join('+'.join(t) for t in SHAPE_TERM_SETS)} and "
                    f"smoothing from {', '.join(map(str, SHAPE_SMOOTHINGS))} by least leave-one-out error; points "
                    f"weighted by the share of their time that is not the fixed part, at least 0.1): "
                    + "; ".join(f"{lay} {'+'.join(mo.terms)} (smoothing {mo.smoothing}): |rate error| median "
                                f"{mo.residual:.1%}, leave-one-out time error median {mo.loo:.1%}"
                                for lay, mo in models.items())
                    + (f"; measured offsets of the {len(st.mm_layer_dims)} named Linear layers ((in, out): "
                       + ", ".join(f"{k}x{n}" for k, n in st.mm_layer_dims) + "), the time factor of the model's rate "
                       "against theirs by layout: " + "; ".join(
                           f"{lay} " + " ".join(f"{math.exp(-v):.2f}" for v in mo.measured.values())
                           for lay, mo in models.items()) if st.mm_layer_dims else "")
                    + "; at M = 1024: " + ", ".join(
                        f"{lay} K=N=128 {_fmt_rate(mo.rate(1024, 128, 128), 'FLOP')}, K=128 N=4096 "
                        f"{_fmt_rate(mo.rate(1024, 128, 4096), 'FLOP')}, K=1024 N=128 "
                        f"{_fmt_rate(mo.rate(1024, 1024, 128), 'FLOP')}" for lay, mo in models.items()))  # fmt: skip
        else:
            sources["matmul_shapes"] = ("not measured: " + ("CUDA's sweep spreads its shapes over FLOPs only; " if cuda
                                        else "") + "matmuls are priced by the layout curves")
        if cuda:
            sources["matmul.fp32"] += (f"; torch.backends.cuda.matmul.allow_tf32 = "
                                       f"{torch.backends.cuda.matmul.allow_tf32}")
        foreach_per_tensor = not cuda
        sources["foreach_per_tensor"] = (
            "CUDA: a _foreach_* op runs multi-tensor kernels over its list (False)" if cuda else
            "True on the CPU: torch's _foreach_* ops have no multi-tensor CPU kernel and fall back to one op per "
            "tensor of the list (a _foreach_* op over n tensors is priced as n launches + its bytes at the rate "
            "of the whole list's)")
        # -- kernels on their own: every elementwise, reduction and copy kernel of the calibration programs --
        kernels: dict[str, KernelCost] = {}
        if not cuda and not step_fit_available():
            kernels, sources["kernels"] = _kernel_costs(
                torch, runner, st, op_s, lambda dt: memory_by_dtype.get(dt, memory), quick, how, rounds)
        else:
            sources["kernels"] = ("not measured: " + ("the recording programs run on the CPU" if cuda else
                                  step_fit_available()) + " (elementwise kernels priced by the memory curves)")

        prices = Prices(op_s=op_s, view_s=view_s, module_s=module_s, sync_s=sync_s, launch_s=launch_s,
                        asynchronous=cuda, matmul=matmul, matmul_layouts=matmul_layouts, matmul_shapes=matmul_shapes_,
                        attention=attention, kernels=kernels,
                        memory=memory,
                        attention_backward=attention_backward, attention_shapes=attention_shapes_,
                        memory_inplace=memory_inplace,
                        foreach_per_tensor=foreach_per_tensor, memory_by_dtype=memory_by_dtype,
                        memory_inplace_by_dtype=memory_inplace_by_dtype)  # fmt: skip

        # -- one loss function call: its Python beyond its ops --
        loss_s, loss_src = _loss_call(torch, runner, dev, gen, prices, grad_op_s, how, rounds, randn)
        sources["host.loss_s"] = loss_src

        # -- gradient checkpointing: a checkpoint() call and its saved-tensor hooks, beyond the recompute --
        checkpoint_s, saved_hook_s, ckpt_src = _checkpoint_calls(torch, runner, st, dev, prices, grad_op_s, how, rounds)
        sources.update(ckpt_src)
        # -- peft's disable_adapter() context (a reference scored by the policy with its adapters off) --
        disable_adapter_s, sources["host.disable_adapter_s"] = _disable_adapter_call(st.repeats)

        # -- AdamW(foreach=True).step() + zero_grad(set_to_none=True), as a training step calls them: the
        # per-tensor cost and the fixed cost per step beyond the counted ops --
        # the ops priced as the engine's optimizer program lists them: the .item() of each step counter
        # (_local_scalar_dense, on host tensors) as a host op at op_s
        oprices = dataclasses.replace(prices, sync_s=op_s)
        opts, regrads, priced = [], [], []
        torch.set_grad_enabled(True)
        for count in st.opt_tensors:
            params = [torch.nn.Parameter(randn(4, "fp32")) for _ in range(count)]
            grads = [randn(4, "fp32") for _ in range(count)]

            def regrad(params: Any = params, grads: Any = grads) -> None:
                for p, g in zip(params, grads):
                    p.grad = g

            regrad()
            opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
            for _ in range(2):
                opt.step()  # states created

            def step(opt: Any = opt, regrad: Any = regrad) -> None:
                regrad()  # zero_grad took them: timed alone too, and taken off
                opt.step()
                opt.zero_grad(set_to_none=True)

            regrad()
            ops, _, _ = count_ops(torch, lambda opt=opt: (opt.step(), opt.zero_grad(set_to_none=True)))
            priced.append(oprices.total(ops)[0 if cuda else 2])  # CUDA: the host's share
            opts.append(_Case(("adamw", count), step, host))
            regrads.append(_Case(("grads", count), regrad, host))
        runner.run("optimizer", opts + regrads)
        torch.set_grad_enabled(False)
        (n1, n2), (c1, c2), (g1, g2) = st.opt_tensors, opts, regrads
        left1, left2 = c1.median - g1.median - priced[0], c2.median - g2.median - priced[1]
        slope = (left2 - left1) / (n2 - n1)
        optimizer_tensor_s = max(slope, 0.0)
        step_fixed = left1 - n1 * optimizer_tensor_s
        optimizer_step_s = max(step_fixed, 0.0)
        adamw = (f"torch.optim.AdamW(foreach=True): step() + zero_grad(set_to_none=True) over {n1} and {n2} 4-element "
                 f"fp32 tensors: {_fmt_s(c1.median)} and {_fmt_s(c2.median)} ({how}, {rounds}, spreads "
                 f"{c1.spread:.0%}, {c2.spread:.0%}), less the loop that gives the tensors their gradients back before "
                 f"each call ({_fmt_s(g1.median)}, {_fmt_s(g2.median)}, timed alone), less its counted aten ops priced "
                 f"as the time model prices them ({_fmt_s(priced[0])}, {_fmt_s(priced[1])}: _foreach_* ops "
                 + ("as one kernel over the list" if not foreach_per_tensor else "as one kernel per tensor")
                 + ", the step counters' .item() as host ops at op_s)")
        sources["host.optimizer_tensor_s"] = f"{adamw}: per extra tensor, the slope between the two counts"
        sources["host.optimizer_step_s"] = (
            f"{adamw}: what is left at {n1} tensors once {n1} x optimizer_tensor_s is taken off "
            f"({_fmt_s(step_fixed)}{', floored at 0' if step_fixed < 0 else ''}): a fixed cost per step() + "
            "zero_grad()")
        notes["optimizer fixed per step"] = _fmt_s(step_fixed)
        del opts, regrads

        host_costs = HostCosts(op_s=op_s, grad_op_s=grad_op_s, backward_op_s=backward_op_s, view_s=view_s,
                               module_s=module_s, sync_s=sync_s, optimizer_tensor_s=optimizer_tensor_s,
                               backward_call_s=backward_call_s, optimizer_step_s=optimizer_step_s, loss_s=loss_s,
                               checkpoint_s=checkpoint_s, saved_hook_s=saved_hook_s,
                               disable_adapter_s=disable_adapter_s)
        model = cpu_model()
        if cuda:
            gpu_name = torch.cuda.get_device_name()
            pid, name = f"cuda-{_slug(gpu_name)}", f"{gpu_name} (host {model}, torch {torch.__version__})"
        else:
            pid = f"cpu-{_slug(model)}"
            name = f"{model} ({threads} torch threads, {socket.gethostname()}, torch {torch.__version__})"
        sources["machine"] = (f"{'GPU ' + torch.cuda.get_device_name() + ', ' if cuda else ''}host {model}, "
                              f"{os.cpu_count()} CPUs, torch threads {threads}, load average {load:.2f} at the start; "
                              f"{'quick' if quick else 'full'} calibration")  # fmt: skip
        profile = DeviceProfile(
            id=pid, name=name, device=device, host_cpu=model, asynchronous=cuda, matmul=matmul,
            matmul_layouts=matmul_layouts, matmul_shapes=matmul_shapes_, kernels=kernels, attention=attention,
            attention_backward=attention_backward, attention_shapes=attention_shapes_,
            memory=memory, memory_inplace=memory_inplace,
            memory_by_dtype=memory_by_dtype, memory_inplace_by_dtype=memory_inplace_by_dtype,
            foreach_per_tensor=foreach_per_tensor, launch_s=launch_s, host=host_costs,
            measured_on=datetime.date.today().isoformat(),
            versions=_versions(torch), sources=sources)  # fmt: skip

        # -- the check: small modules' forwards, timed and predicted --
        checks = _checks(torch, F, runner, st, dev, profile, randn)
        profile = profile.model_copy(update={"sources": {**sources, "check": "; ".join(
            f"{c.name}: measured {_fmt_s(c.measured_s)} ({rounds}, spread {c.spread:.0%}), predicted "
            f"{_fmt_s(c.predicted_s)} from {c.ops} aten ops and {c.modules} module calls: error {c.error:+.1%} "
            f"({_fmt_s(abs(c.measured_s - c.predicted_s) / max(c.modules, 1))} a module call "
            f"{'unexplained' if c.measured_s > c.predicted_s else 'too many'})"
            for c in checks)}})  # fmt: skip
    finally:
        torch.set_grad_enabled(prev_grad)
    cpus = os.cpu_count() or 1
    if math.isfinite(load) and load >= 0.9 and load >= 0.45 * cpus:
        notes["load"] = (f"load average {load:.2f} on {cpus} CPUs when the calibration started: other processes "
                         "compete for the CPU, so the figures are noisy (see the spreads in sources)")
    return Calibration(profile=profile, checks=checks, elapsed_s=time.perf_counter() - start, notes=notes)


def _autograd(torch: Any, runner: _Runner, st: Settings, dev: Any, view_s: float, how: str,
              rounds: str) -> tuple[float, float, float, dict[str, str]]:  # fmt: skip
    """(host.grad_op_s, host.backward_op_s, host.backward_call_s, their sources).

    grad_op_s: a 1-element add and a 1-element mul of a tensor that requires grad by a constant,
    under grad mode (autograd makes a node, the mul saves its inputs): the mean of the two.
    backward_op_s: `y.backward(g)` of a chain y = x * c * c ... of n1 and of n2 muls (the leaf's grad
    reset each call), less the chain's forward, less the backward's views at view_s, divided by the
    aten ops that run a kernel in it (a TorchDispatchMode counts them): the slope between the two
    lengths, so that the fixed cost of a backward() call does not count per op; that fixed cost
    (what is left at n1 ops once n1 x backward_op_s is taken off, floored at 0) is backward_call_s."""
    clock_how = "host" if runner.clock.cuda else "wall"
    n1, n2 = st.autograd_chain
    sources: dict[str, str] = {}
    with torch.enable_grad():
        x = torch.ones(1, device=dev, requires_grad=True)
        c = torch.full((1,), 1.0001, device=dev)
        g = torch.ones(1, device=dev)

        def chain(n: int) -> Callable[[], Any]:
            def f() -> Any:
                y = x
                for _ in range(n):
                    y = y * c
                return y

            return f

        def chain_backward(n: int) -> Callable[[], Any]:
            f = chain(n)

            def fb() -> None:
                f().backward(g)
                x.grad = None

            return fb

        cases = [_Case("grad add", lambda: torch.add(x, c), clock_how), _Case("grad mul", lambda: torch.mul(x, c), clock_how),
                 _Case(("chain", n1), chain(n1), clock_how), _Case(("chain", n2), chain(n2), clock_how),
                 _Case(("backward", n1), chain_backward(n1), clock_how),
                 _Case(("backward", n2), chain_backward(n2), clock_how)]  # fmt: skip
        d = {k.key: k for k in runner.run("autograd", cases)}
        counted = {}
        for n in (n1, n2):
            y = chain(n)()
            ops, _, _ = count_ops(torch, lambda y=y: y.backward(g))
            x.grad = None
            counted[n] = (sum(1 for o in ops if o.kind not in ("view", "sync")), sum(1 for o in ops if o.kind == "view"))
    grad_op_s = (d["grad add"].median + d["grad mul"].median) / 2
    bwd = {n: d[("backward", n)].median - d[("chain", n)].median - counted[n][1] * view_s for n in (n1, n2)}
    (k1, _), (k2, _) = counted[n1], counted[n2]
    backward_op_s, fixed, slope_how = backward_slope(bwd[n1], bwd[n2], k1, k2)
    backward_call_s = max(fixed, 0.0)
    sources["host.grad_op_s"] = (
        f"mean of torch.add ({_fmt_s(d['grad add'].median)}, spread {d['grad add'].spread:.0%}) and torch.mul "
        f"({_fmt_s(d['grad mul'].median)}, spread {d['grad mul'].spread:.0%}) of a 1-element tensor that requires grad "
        f"and a constant, under grad mode (autograd records a node; the mul saves its inputs) ({how}, {rounds}); "
        f"per mul of a {n1}..{n2}-mul chain: {_fmt_s((d[('chain', n2)].median - d[('chain', n1)].median) / (n2 - n1))}")
    sources["host.backward_op_s"] = (
        f"y.backward(g) of y = x * c * ... * c (x a 1-element leaf that requires grad), {n1} and {n2} muls: "
        f"{_fmt_s(d[('backward', n1)].median)} and {_fmt_s(d[('backward', n2)].median)} with the chain's forward "
        f"({_fmt_s(d[('chain', n1)].median)}, {_fmt_s(d[('chain', n2)].median)}) taken off, and the backward's views "
        f"({counted[n1][1]}, {counted[n2][1]}) at view_s; per aten op that runs a kernel in the backward ({k1}, {k2}, "
        f"counted by a TorchDispatchMode): {slope_how} ({how}, {rounds}, spreads "
        f"{d[('backward', n1)].spread:.0%}, {d[('backward', n2)].spread:.0%}); the fixed cost of a backward() call "
        f"is not per op: host.backward_call_s")
    sources["host.backward_call_s"] = (
        f"y.backward(g) of the {n1}-mul chain of host.backward_op_s ({_fmt_s(d[('backward', n1)].median)}, the leaf's "
        f"grad reset included) less the chain's forward ({_fmt_s(d[('chain', n1)].median)}), its views at view_s and "
        f"its {k1} kernel-running ops at the fitted slope backward_op_s ({_fmt_s(backward_op_s)}): {_fmt_s(fixed)}"
        f"{', floored at 0' if fixed < 0 else ''} a backward() call (the autograd engine's start: graph walk, "
        f"ready queue) ({how}, {rounds})")
    return grad_op_s, backward_op_s, backward_call_s, sources


def backward_slope(bwd1: float, bwd2: float, k1: int, k2: int) -> tuple[float, float, str]:
    """(per-op cost, fixed cost, how) of a backward() that costs bwd1 at k1 kernel-running ops and
    bwd2 at k2 > k1: the slope (bwd2 - bwd1) / (k2 - k1) and the intercept bwd1 - k1 x slope. On a
    noisy machine the slope can come out at or below 0 (the two timings' noise exceeds the
    k2 - k1 ops' cost; seen on a CI runner): the per-op cost is then bwd2 / k2 (the fixed cost
    shared among the ops, an upper bound) and the fixed cost 0, and `how` says so."""
    if k2 > k1:
        slope = (bwd2 - bwd1) / (k2 - k1)
        if slope > 0:
            return slope, bwd1 - k1 * slope, "the slope between the two lengths"
    per_op = max(bwd2, 0.0) / max(k2, 1)
    return per_op, 0.0, (f"the slope between the two lengths was not positive (noise), so the longer chain's "
                         f"backward per op ({_fmt_s(per_op)}, its fixed cost included)")


LOSS_SHAPE = (1, 8, 256)  # batch, seq, vocabulary of the loss micro-benchmark's logits


def _loss_call(torch: Any, runner: _Runner, dev: Any, gen: Any, prices: Prices, grad_op_s: float, how: str,
               rounds: str, randn: Callable[[int, Any], Any]) -> tuple[float, str]:  # fmt: skip
    """(host.loss_s, its source): transformers' ForCausalLMLoss (what a causal LM's forward calls
    with labels) on tiny fp32 and bf16 logits that require grad, under grad mode, timed; less its
    counted aten ops priced as the time model prices a forward under autograd (grad_op_s per
    kernel-running op, view_s per view, + their device time from the curves); the median of the
    two. 0 when transformers is not importable."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except Exception as e:  # noqa: BLE001 - transformers is optional
        return 0.0, (f"not measured: transformers' ForCausalLMLoss is not importable here ({one_line(e)}): "
                     "loss_s left 0")
    b, s, v = LOSS_SHAPE
    gprices = dataclasses.replace(prices, op_s=grad_op_s)
    cases, priced, counted = [], [], []
    torch.set_grad_enabled(True)
    try:
        for dt in ("fp32", "bf16"):
            logits = randn(b * s * v, dt).view(b, s, v).requires_grad_(True)
            labels = torch.randint(0, v, (b, s), device=dev, generator=gen)

            def loss(logits: Any = logits, labels: Any = labels) -> Any:
                return ForCausalLMLoss(logits, labels, vocab_size=v)

            loss()
            ops, _, _ = count_ops(torch, loss)
            counted.append(ops)
            priced.append(gprices.total(ops)[0 if prices.asynchronous else 2])  # CUDA: the host's share
            cases.append(_Case(("loss", dt), loss, how="host" if prices.asynchronous else "wall"))
        runner.run("loss", cases)
    finally:
        torch.set_grad_enabled(False)
    left = [c.median - p for c, p in zip(cases, priced)]
    loss_s = max(_median(left), 0.0)
    src = (f"transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, vocab_size={v}) on logits [{b}, {s}, {v}] "
           f"that require grad, under grad mode, fp32 and bf16: "
           + "; ".join(f"{c.key[1]} {_fmt_s(c.median)} (spread {c.spread:.0%}) less its {len(ops)} counted aten ops "
                       f"({sum(1 for o in ops if o.kind not in ('view', 'sync'))} running a kernel at grad_op_s, the "
                       f"views at view_s, + their device time: {_fmt_s(p)}) = {_fmt_s(x)}"
                       for c, ops, p, x in zip(cases, counted, priced, left))
           + f" ({how}, {rounds}); the median of the two"
           + (", floored at 0" if _median(left) < 0 else "")
           + "; priced once per causal-LM loss (labels given to the forward) and once per technique loss")
    return loss_s, src


# kernel costs: per (aten name, dtype), at most this many of its distinct calls are replayed, spread
# over their bytes; the recording programs add to the calibration programs a larger sft step per
# dtype (its elementwise tensors and logits reach the sizes of the time validation's programs)
KERNEL_CALLS = 6
KERNEL_ESTIMATE = (450, 150)  # replayed calls (full, quick) for the progress bar
KERNEL_LARGE = dict(layers=1, hidden=256, intermediate=688, heads=8, kv_heads=4, vocab=8000, batch=4, seq=256)


def kernel_programs(root: str | Path, which: str) -> list[Any]:
    """The programs whose kernels `_kernel_costs` replays: the calibration programs and, beyond the
    quick set, one larger sft step per dtype (KERNEL_LARGE; recorded, not timed as a whole)."""
    from planner.backends.step_programs import Case, llama_config, write_config
    from planner.specs import Plan

    cases = calibration_cases(root, which)
    if which != "quick":
        k = KERNEL_LARGE
        path = write_config(root, f"kernels-llama-{k['layers']}x{k['hidden']}",
                            llama_config(k["layers"], k["hidden"], k["intermediate"], k["heads"], k["kv_heads"], k["vocab"]))
        for precision in ("fp32", "bf16"):
            cases.append(Case(f"kernels sft full {precision} {k['layers']}x{k['hidden']} b{k['batch']} s{k['seq']}",
                              Plan(model=path, batch=k["batch"], seq=k["seq"], precision=precision), steps=1, warmup=1))
    return cases


def record_kernel_calls(torch: Any, cases: Sequence[Any]) -> dict[tuple[str, str], list[tuple[float, Callable[[], Any]]]]:
    """Per (aten name, dtype): the distinct calls (by their tensors' shapes) of out-of-place kernels
    that are neither matmuls, attention nor _foreach_* ops, from one steady step of each program
    (after a warm-up step), each as (bytes read + written, a function that replays the call on the
    recorded arguments). In-place ops are left out: replaying one would change its operands."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from planner.backends.timing import run_step, timed_program

    calls: dict[tuple[str, str], dict[tuple, tuple[float, Callable[[], Any]]]] = {}

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            op = classify(torch, func, args, kwargs, out)
            if (op.kind == "kernel" and op.tensors == 1 and not op.name.endswith("_") and op.bytes > 0
                    and not op.name.startswith(("_foreach_", "_fused_", "rand", "bernoulli", "normal"))):  # fmt: skip
                shapes = tuple(tuple(t.shape) for t in _tensors(torch, (args, kwargs)))
                group = calls.setdefault((op.name, op.dtype), {})
                if shapes not in group:
                    group[shapes] = (op.bytes, lambda func=func, args=args, kwargs=kwargs: func(*args, **kwargs))
            return out

    for case in cases:
        with torch.enable_grad(), timed_program(case.tech, case.plan, case.config) as ctx:
            run_step(case.tech, ctx, 0)
            with _Record():
                run_step(case.tech, ctx, 1)
    return {key: sorted(group.values(), key=lambda c: c[0]) for key, group in calls.items()}


KERNEL_BIG = 65536  # calls of at least this many bytes give a kernel its own rate; smaller ones its fixed part


def fit_kernel(samples: Sequence[tuple[float, float]], op_s: float) -> tuple[float, RateCurve | None]:
    """(fixed_s, rate) of a kernel from (bytes, seconds a call) samples, each call host.op_s + fixed +
    bytes / rate(bytes): fixed is what the calls under KERNEL_BIG bytes take beyond op_s (their
    median; 0 without such calls), the rate a curve through the larger calls' bytes / (time - op_s -
    fixed) (None without such calls: the memory curve prices their size)."""
    small = [t - op_s for b, t in samples if b < KERNEL_BIG]
    fixed = max(statistics.median(small), 0.0) if small else 0.0
    big = sorted((b, b / max(t - op_s - fixed, 0.05 * t)) for b, t in samples if b >= KERNEL_BIG)
    if not big:
        return fixed, None
    pts: list[tuple[float, float]] = []
    for b, r in big:  # sizes strictly ascending (two calls of one size: their mean rate)
        if pts and b <= pts[-1][0] * (1 + 1e-9):
            pts[-1] = (pts[-1][0], (pts[-1][1] + r) / 2)
        else:
            pts.append((b, r))
    return fixed, RateCurve(points=tuple(pts))


def _attention_shape_models(torch: Any, runner: Any, st: Settings, randn: Callable[[int, Any], Any],
                            fixed_of: Callable[[Callable[[], Any]], float], bprices: Prices, bwd_call: float,
                            rounds: str) -> tuple[dict[str, dict[str, MatmulShapes]], str]:  # fmt: skip
    """The SDPA shape sweep (`attention_shapes`) timed and fitted: per dtype a forward model over the
    prefill shapes, a decode model over the decode shapes (the kernel over one query row runs at a fraction
    of a prefill's rate whatever its FLOPs) and a backward model over the backward shapes (`fit_matmul_shapes` on
    (M, K, N) = AttentionShape.mkn, FLOPs 2.5x for the backward), and its source line. Each call as a
    transformers model makes it (AttentionShape), its operands cycled over copies spanning
    st.cold_bytes; the fixed part: the call's counted ops priced as the curves' (fixed_of; the backward:
    the backward call and its ops at bprices)."""
    import torch.nn.functional as F

    prefill, decode, backward = attention_shapes(st)
    models: dict[str, dict[str, MatmulShapes]] = {}
    parts = []
    for dt in st.attn_dtypes:
        elem = 4 if dt == "fp32" else 2

        def operands(a: AttentionShape, grad: bool) -> tuple[Any, Any, Any]:
            q = randn(a.batch * a.queries * a.heads * a.dim, dt).view(a.batch, a.queries, a.heads, a.dim).transpose(1, 2)
            k, v = (randn(a.batch * a.kv_heads * a.keys * a.dim, dt).view(a.batch, a.kv_heads, a.keys, a.dim)
                    for _ in range(2))
            return (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)) if grad else (q, k, v)

        def footprint(a: AttentionShape) -> int:
            return (2 * a.batch * a.heads * a.queries + 2 * a.batch * a.kv_heads * a.keys) * a.dim * elem

        fwd_cases, fwd_fixed = [], []
        for a in prefill + decode:
            fns = []
            for _ in range(min(64, copies_for(footprint(a), st.cold_bytes))):
                q, k, v = operands(a, False)
                fns.append(lambda q=q, k=k, v=v, c=a.causal: F.scaled_dot_product_attention(
                    q, k, v, is_causal=c, enable_gqa=True))
            fwd_cases.append(_Case(("forward", a), _cycle(fns)))
            fwd_fixed.append(fixed_of(fns[0]))
        bwd_cases, bwd_fixed = [], []
        with torch.enable_grad():
            for a in backward:
                fns, ops = [], None
                for _ in range(min(64, copies_for(3 * footprint(a), st.cold_bytes))):
                    ins = operands(a, True)
                    o = F.scaled_dot_product_attention(*ins, is_causal=True, enable_gqa=True)
                    g = randn(o.numel(), dt).view(a.batch, a.queries, a.heads, a.dim).transpose(1, 2)

                    def grads(o: Any = o, ins: Any = ins, g: Any = g) -> Any:
                        return torch.autograd.grad(o, ins, g, retain_graph=True)

                    fns.append(grads)
                ops, _, _ = count_ops(torch, fns[0])
                bwd_cases.append(_Case(("backward", a), _cycle(fns)))
                bwd_fixed.append(bwd_call + bprices.fixed(ops))
        runner.run(f"attention shapes {dt}", fwd_cases + bwd_cases)
        timed = [(c.key[1], c.median, fx) for c, fx in zip(fwd_cases, fwd_fixed)]
        fwd = fit_matmul_shapes([(*a.mkn(), t, fx) for a, t, fx in timed if a.causal], what="SDPA prefill")
        dcd = fit_matmul_shapes([(*a.mkn(), t, fx) for a, t, fx in timed if not a.causal], what="SDPA decode")
        bwd = fit_matmul_shapes([(*a.mkn(2.5), c.median, fx) for c, fx in zip(bwd_cases, bwd_fixed)
                                 for a in [c.key[1]]], what="SDPA backward")  # fmt: skip
        models[dt] = {"forward": fwd, "decode": dcd, "backward": bwd}
        spreads = [c.spread for c in fwd_cases + bwd_cases]

        def at(mo: MatmulShapes, a: AttentionShape, passes: float = 1.0) -> str:
            return _fmt_rate(mo.rate(*a.mkn(passes)), "FLOP")

        ref = [AttentionShape(2, 4, 2, 512, 512, d) for d in (16, 64)]
        dec = AttentionShape(1, 4, 2, 1, 512, 64)
        parts.append(
            f"{dt}: " + ", ".join(f"{ps} {'+'.join(mo.terms)} (smoothing {mo.smoothing}): |rate error| median "
                                  f"{mo.residual:.1%}, leave-one-out time error median {mo.loo:.1%}"
                                  for ps, mo in models[dt].items())
            + f"; spreads median {_median(spreads):.0%}; at B=2 H=4 "
            f"S=512 forward D=16 {at(fwd, ref[0])}, D=64 {at(fwd, ref[1])}, backward D=16 {at(bwd, ref[0], 2.5)}, "
            f"D=64 {at(bwd, ref[1], 2.5)}; decode B=1 H=4 L=512 D=64 {at(dcd, dec)}")
    source = (
        f"F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=True) as transformers calls it (q a "
        f"(B, S, H, D) tensor transposed to (B, H, S, D), k and v (B, H/2, keys, D) contiguous; its backward "
        f"torch.autograd.grad of the retained output with the gradient in q's layout) over {len(prefill)} prefill "
        f"(causal, S = keys), {len(decode)} decode (one query row over the cache) and {len(backward)} backward shapes "
        f"spread over (log M, log K, log N) of a grid of B {ATTN_BATCHES}, (H, KV) {ATTN_HEADS}, D {ATTN_HEAD_DIMS}, S "
        f"{ATTN_PREFILL_LENGTHS}, cache {ATTN_DECODE_LENGTHS}, at most {st.attn_shape_max_flops:.0e} forward "
        f"FLOPs (the backward a quarter); M = FLOPs / (2 K N) query rows, K = D, N = the key length; fixed part: the "
        f"call's counted ops (the backward: host.backward_call_s and its ops); {rounds}; one model per pass (forward: the "
        f"prefill shapes, decode, backward), fitted as matmul_shapes (least leave-one-out error over the same term sets "
        f"and smoothings): " + "; ".join(parts))
    return models, source


def _kernel_costs(torch: Any, runner: _Runner, st: Settings, op_s: float, memory_of: Callable[[str], RateCurve],
                  quick: bool, how: str, rounds: str) -> tuple[dict[str, KernelCost], str]:  # fmt: skip
    """The profile's `kernels` and their source: every out-of-place elementwise, reduction or copy
    kernel of the calibration programs (record_kernel_calls), up to KERNEL_CALLS distinct calls per
    (name, dtype) spread over their bytes, each replayed on its recorded arguments (a Python call of
    the aten overload: host.op_s + the kernel) in interleaved rounds, then fit_kernel; `memory_of`
    (the memory curve of a dtype) only for the source's comparison."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="planner-kernels-") as root:
        recorded = record_kernel_calls(torch, kernel_programs(root, "quick" if quick else "full"))
    cases, keys = [], []
    for key, group in sorted(recorded.items()):
        for b, fn in _spread(group, KERNEL_CALLS):
            cases.append(_Case((key, b), fn, "wall"))
            keys.append(key)
    runner.run("kernels", cases)
    kernels: dict[str, KernelCost] = {}
    slow = []  # (its rate over the memory curve's at its largest call, key)
    for key in sorted(recorded):
        samples = [(c.key[1], c.median) for c in cases if c.key[0] == key]
        fixed, rate = fit_kernel(samples, op_s)
        kernels[f"{key[0]}.{key[1]}"] = KernelCost(fixed_s=fixed, rate=rate, calls=len(samples),
                                                    bytes_range=(samples[0][0], samples[-1][0]))
        if rate is not None:
            b = samples[-1][0]
            slow.append((rate.rate(b) / memory_of(key[1]).rate(b), f"{key[0]}.{key[1]}"))
    slow.sort()
    src = (f"{len(kernels)} kernels (aten name.dtype) of the calibration programs and a larger sft step per dtype "
           f"(recorded by a TorchDispatchMode: out-of-place ops that are neither matmuls, attention nor _foreach_*), "
           f"up to {KERNEL_CALLS} distinct calls each spread over their bytes, {len(cases)} calls replayed on their "
           f"recorded arguments ({how}, {rounds}); per kernel (planner.backends.calibrate.fit_kernel) t = host.op_s + "
           f"fixed (the median of its calls under {KERNEL_BIG} bytes) + bytes / its rate (a curve through the larger "
           f"calls; {len(slow)} kernels have one, the others are sized by the memory curve)"
           + (f"; at its largest call, rate over the memory curve's from {slow[0][0]:.2g} ({slow[0][1]}) to "
              f"{slow[-1][0]:.2g} ({slow[-1][1]})" if slow else "")) if kernels else "no kernels recorded"
    return kernels, src


# peft's disable_adapter() walks every module of the model and switches each LoRA layer's adapters off
# (requires_grad_ over its ModuleDicts), and on again at exit: pure Python, no op. On this CPU it took
# 370-490 us per LoRA layer (2 x 64 to 16 x 64 llama, all-linear r8, 14-112 LoRA layers, 2026-12-07): 5.6 ms
# a call for the 2-layer model, whose reference forward it wraps in TRL's DPO (7.6 ms measured, 4.0 ms
# priced without it); an 8B model's 224 LoRA layers would take ~90 ms a call here.
def _disable_adapter_call(repeats: int) -> tuple[float, str]:
    """(seconds per LoRA layer of one `with model.disable_adapter(): pass`, its source): a llama of 2
    layers of hidden 32 with LoRA (r 4) on every Linear; 0 where transformers or peft are missing."""
    missing = step_fit_available()
    if missing:
        return 0.0, f"not measured: {missing}"
    import peft
    import transformers

    from planner.backends.dryrun._build import hf_config
    from planner.backends.step_programs import llama_config

    m = CALIBRATION_MODEL
    cfg = hf_config(llama_config(2, m["hidden"], m["intermediate"], m["heads"], m["kv_heads"], m["vocab"]), use_cache=False)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg),
                                peft.LoraConfig(r=4, target_modules="all-linear"))
    layers = sum(1 for mod in model.modules() if isinstance(mod, peft.tuners.lora.LoraLayer))
    calls, samples = 20, []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        for _ in range(calls):
            with model.disable_adapter():
                pass
        samples.append((time.perf_counter() - t0) / calls)
    per_layer = _median(samples) / layers
    return per_layer, (f"`with model.disable_adapter(): pass` on a peft llama of 2 layers of hidden {m['hidden']}, LoRA r 4 on "
                       f"every Linear ({layers} LoRA layers): {_fmt_s(_median(samples))} a call (median of "
                       f"{len(samples)} samples of {calls} calls, spread {_spread_of(samples):.0%}) / {layers}")


def _checkpoint_calls(torch: Any, runner: _Runner, st: Settings, dev: Any, prices: Prices, grad_op_s: float,
                      how: str, rounds: str) -> tuple[float, float, dict[str, str]]:  # fmt: skip
    """(host.checkpoint_s, host.saved_hook_s, their sources): torch.utils.checkpoint (non-reentrant, as
    transformers' gradient checkpointing calls it) around a chain y = sin(...sin(x)) of n1 and of n2
    sins (each saves its input), forward + backward, against the same chain without it. The
    difference, less the ops the checkpointed run adds (the recompute, counted by a
    TorchDispatchMode and priced as the time model prices them: kernels at grad_op_s + their device
    time, views at view_s), is per checkpoint() call checkpoint_s (its forward's and its recompute's
    set-up: RNG state, autocast state, context managers, the frame) plus per saved tensor three
    Python hook calls (pack in the forward, pack in the recompute, unpack in the backward) at
    saved_hook_s each: the slope between the two lengths / 3, and what is left at n1."""
    from torch.utils.checkpoint import checkpoint

    n1, n2 = st.autograd_chain
    clock_how = "host" if runner.clock.cuda else "wall"
    gprices = dataclasses.replace(prices, op_s=grad_op_s)
    with torch.enable_grad():
        x = torch.full((4,), 0.5, device=dev, requires_grad=True)

        def chain(n: int) -> Callable[[Any], Any]:
            def f(y: Any) -> Any:
                for _ in range(n):
                    y = torch.sin(y)
                return y

            return f

        def plain(n: int) -> Callable[[], None]:
            f = chain(n)

            def run() -> None:
                f(x).sum().backward()
                x.grad = None

            return run

        def checkpointed(n: int) -> Callable[[], None]:
            f = chain(n)

            def run() -> None:
                checkpoint(f, x, use_reentrant=False).sum().backward()
                x.grad = None

            return run

        cases = [_Case((kind, n), fn(n), clock_how) for n in (n1, n2)
                 for kind, fn in (("plain", plain), ("checkpoint", checkpointed))]
        extra = {}
        for n in (n1, n2):
            a, _, _ = count_ops(torch, plain(n))
            b, _, _ = count_ops(torch, checkpointed(n))
            kernels = sum(1 for o in b if o.kind not in ("view", "sync")) - sum(1 for o in a if o.kind not in ("view", "sync"))
            views = sum(1 for o in b if o.kind == "view") - sum(1 for o in a if o.kind == "view")
            # the recompute's kernels are sins like the forward's: priced as one of them each
            sin = next(o for o in a if o.name == "sin")
            extra[n] = (kernels, views, max(kernels, 0) * sum(gprices.op(sin)[:2]) + max(views, 0) * prices.view_s)
        d = {c.key: c for c in runner.run("checkpoint", cases)}
    left = {n: d[("checkpoint", n)].median - d[("plain", n)].median - extra[n][2] for n in (n1, n2)}
    slope = (left[n2] - left[n1]) / (n2 - n1)
    saved_hook_s = max(slope / 3, 0.0)
    fixed = left[n1] - 3 * n1 * saved_hook_s
    checkpoint_s = max(fixed, 0.0)
    timed = "; ".join(f"{n} sins: {_fmt_s(d[('plain', n)].median)} without, {_fmt_s(d[('checkpoint', n)].median)} with "
                      f"(spreads {d[('plain', n)].spread:.0%}, {d[('checkpoint', n)].spread:.0%}), the recompute's "
                      f"{extra[n][0]} kernels and {extra[n][1]} views priced {_fmt_s(extra[n][2])}: {_fmt_s(left[n])} left"
                      for n in (n1, n2))
    what = (f"torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False) of f = a chain of sins (each saves its "
            f"input) on a 4-element tensor that requires grad, forward + backward, against f alone ({how}, {rounds}): "
            f"{timed}")
    sources = {
        "host.saved_hook_s": (f"{what}; per saved tensor, the slope between the two lengths / 3 (pack in the forward, "
                              f"pack in the recompute, unpack in the backward: Python hooks)"
                              + (", floored at 0" if slope < 0 else "")),
        "host.checkpoint_s": (f"{what}; what is left at {n1} sins once {3 * n1} hook calls are taken off "
                              f"({_fmt_s(fixed)}{', floored at 0' if fixed < 0 else ''}): one checkpoint() call's forward "
                              "and recompute set-up (RNG and autocast state, context managers, the frame)"),
    }
    return checkpoint_s, saved_hook_s, sources


def _versions(torch: Any) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available() and torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    try:
        from importlib import metadata

        out["transformers"] = metadata.version("transformers")
    except Exception:  # noqa: BLE001 - optional
        pass
    return out


def _checks(torch: Any, F: Any, runner: _Runner, st: Settings, dev: Any, profile: DeviceProfile,
            randn: Callable[[int, Any], Any]) -> list[CheckResult]:  # fmt: skip
    prices = Prices.of(profile)
    torch.manual_seed(0)
    mods: list[tuple[str, Any, Callable[[], Any]]] = []
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).to(dev)
    x = randn(64 * 256, "fp32").view(64, 256)
    mods.append(("2-layer MLP 256-1024-256 (GELU), 64 tokens, fp32 forward", mlp, lambda: mlp(x)))
    if st.check_llama:
        try:
            from transformers import LlamaConfig
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        except Exception:  # noqa: BLE001 - transformers is optional: the MLP check stands alone
            LlamaConfig = None  # noqa: N806
        if LlamaConfig is not None:
            cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=1, vocab_size=1000, max_position_embeddings=1024)
            cfg._attn_implementation = "sdpa"
            for dt in ("fp32", "bf16"):
                tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
                layer = LlamaDecoderLayer(cfg, 0).to(dev, tdt)
                rope = LlamaRotaryEmbedding(cfg).to(dev)
                h = randn(128 * 256, dt).view(1, 128, 256)
                pos = torch.arange(128, device=dev)[None]
                pe = tuple(t.to(tdt) for t in rope(h, pos))
                mods.append((f"transformers LlamaDecoderLayer (hidden 256, 4 heads, 2 KV heads, MLP 688), 1 x 128 "
                             f"tokens, {dt} forward", layer,
                             lambda layer=layer, h=h, pe=pe, pos=pos: layer(h, position_embeddings=pe, position_ids=pos)))
    counted = []
    for _, _, fn in mods:
        fn()
        ops, calls, _ = count_ops(torch, fn)
        counted.append((ops, calls))
    cases = [_Case(name, fn, "wall") for name, _, fn in mods]
    runner.run("check", cases)
    out = []
    for c, (ops, calls) in zip(cases, counted):
        out.append(CheckResult(c.key, c.median, prices.total(ops, calls)[2], c.spread, len(ops), calls))
    return out


# ---- fitting a profile to whole-step measurements -------------------------------------------------
PLAN_COLUMNS = ("model", "task", "method", "precision", "batch", "seq", "grad_ckpt", "lora_rank", "prompt_len",
                "new_tokens")  # fmt: skip
MEASURED_COLUMNS = ("step_s", "first_step_s", "tokens_per_s", "prefill_s", "generate_s", "peak_allocated_bytes",
                    "peak_reserved_bytes", "cublas_workspaces_in_peak_bytes")  # fmt: skip
DEFAULT_FIT = ("host.op_s", "host.module_s", "launch_s")
Predict = Callable[[Any, Any, DeviceProfile, Any], float]


def float_paths() -> tuple[str, ...]:
    """Dotted paths of the profile's float fields (what --fit may name)."""
    floats = (float, float | None)
    out = [n for n, f in DeviceProfile.model_fields.items() if f.annotation in floats]
    out += [f"host.{n}" for n, f in HostCosts.model_fields.items() if f.annotation in floats]
    out += [f"{field}.{d}" for field in PER_DTYPE for d in DTYPES]
    return tuple(out)


# per-dtype float fields of a profile (a dict by dtype): their value when the dtype is not in the dict
PER_DTYPE = {"dtype_scale": 1.0, "matmul_fixed_s": 0.0}


def parse_fit_params(text: str | Sequence[str] | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_FIT
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise StepsError(f"fit: name at least one parameter ({', '.join(float_paths())})")
    known = float_paths()
    for n in names:
        if n not in known:
            raise StepsError(f"fit: unknown parameter '{n}'{did_you_mean(n, known) or ''} "
                             f"(choose from {', '.join(known)})")
    dup = [n for n in names if names.count(n) > 1]
    if dup:
        raise StepsError(f"fit: parameter '{dup[0]}' named twice")
    return tuple(names)


def get_param(profile: DeviceProfile, path: str) -> float:
    """The float at a dotted path; an optional host cost left unset (grad_op_s, backward_op_s) is
    what prices in its place (HostCosts.op_cost: op_s)."""
    field, _, dtype = path.partition(".")
    if field in PER_DTYPE:
        return float(getattr(profile, field).get(dtype, PER_DTYPE[field]))
    obj: Any = profile
    for part in path.split("."):
        obj = getattr(obj, part)
    if obj is None and path.startswith("host."):
        return float(profile.host.op_s)
    return float(obj)


def with_params(profile: DeviceProfile, values: dict[str, float]) -> DeviceProfile:
    """The profile with these dotted-path float fields replaced (no re-validation: values are >= 0)."""
    top: dict[str, Any] = {k: v for k, v in values.items() if "." not in k and k != "device_scale"}
    host = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("host.")}
    if host:
        top["host"] = profile.host.model_copy(update=host)
    fixed = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("matmul_fixed_s.")}
    if fixed:
        top["matmul_fixed_s"] = {**profile.matmul_fixed_s, **fixed}
    out = profile.model_copy(update=top)
    if "device_scale" in values:  # the curves include the scale: rescale them
        out = out.with_device_scale(max(values["device_scale"], 1e-3))
    for k, v in values.items():
        if k.startswith("dtype_scale."):  # the same: that dtype's curves rescaled
            out = out.with_dtype_scale(k.split(".", 1)[1], max(v, 1e-3))
    return out


@dataclass(frozen=True)
class StepRow:
    row: int  # data rows counted from 1 (the header is line 1, row 1 is line 2)
    label: str
    plan: Any
    model: Any
    gpu: Any
    target: str  # step_s or generate_s
    measured: float
    weight: float = 1.0  # of its residual in the fit (fit_cases: the precision of the program's timing)


def _label(row: int, v: dict[str, str], plan: Any) -> str:
    parts = [plan.model, plan.task, plan.method, plan.precision, f"b{plan.batch}"]
    if plan.task == "generate":
        parts.append(f"p{plan.prompt_len}+{plan.new_tokens}")
    else:
        parts.append(f"s{plan.seq}")
        if plan.grad_ckpt:
            parts.append("ckpt")
    if plan.method != "full" and v.get("lora_rank"):
        parts.append(f"r{plan.lora_rank}")
    if plan.gpu:
        parts.append(plan.gpu)
    return f"{row}: {' '.join(str(p) for p in parts)}"


def read_steps(path: str | Path) -> list[StepRow]:
    """The rows of a whole-step CSV; StepsError (one line: file, row, column) on anything unusable."""
    from planner.errors import PlanError
    from planner.gpus import load_gpu
    from planner.models import load_model
    from planner.plan_io import FIELDS, build_plan

    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StepsError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise StepsError(f"{name}: is a directory, not a CSV file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StepsError(f"{name}: cannot read: {one_line(getattr(e, 'strerror', None) or e)}") from None
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise StepsError(f"{name}: not a CSV file ({one_line(e)})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise StepsError(f"{name}: empty (give a header row and one row per measured step)")
    header = [c.strip() for c in rows[0]]
    known = tuple(FIELDS) + MEASURED_COLUMNS
    for col in header:
        if not col:
            raise StepsError(f"{name}: header: an empty column name")
        if col not in known:
            raise StepsError(f"{name}: header: unknown column '{col}'{did_you_mean(col, known) or ''} (columns: "
                             f"plan fields such as {', '.join(PLAN_COLUMNS)}, gpu; measured: {', '.join(MEASURED_COLUMNS)})")
        if header.count(col) > 1:
            raise StepsError(f"{name}: header: column '{col}' given twice")
    if "model" not in header:
        raise StepsError(f"{name}: header: no column 'model'")
    if "step_s" not in header and "generate_s" not in header:
        raise StepsError(f"{name}: header: no target column (step_s for training rows, generate_s for generate rows)")
    if len(rows) < 2:
        raise StepsError(f"{name}: no data rows, only a header")
    models: dict[str, Any] = {}
    gpus: dict[str, Any] = {}
    out: list[StepRow] = []
    for i, raw in enumerate(rows[1:], start=1):
        if len(raw) > len(header):
            raise StepsError(f"{name}: row {i}: {len(raw)} values for {len(header)} columns")
        v = {col: (raw[j].strip() if j < len(raw) else "") for j, col in enumerate(header)}
        for col in MEASURED_COLUMNS:
            s = v.get(col, "")
            if s:
                try:
                    x = float(s)
                except ValueError:
                    raise StepsError(f"{name}: row {i}, column {col}: not a number (got {s!r})") from None
                if not math.isfinite(x) or x < 0:
                    raise StepsError(f"{name}: row {i}, column {col}: must be a finite number >= 0 (got {s!r})")
        flags = {k: s for k, s in v.items() if k in FIELDS and s != ""}
        try:
            plan, _ = build_plan(None, flags)
        except PlanError as e:
            msg = one_line(e)
            col, sep, rest = msg.partition(": ")
            if sep and col in header:
                raise StepsError(f"{name}: row {i}, column {col}: {rest}") from None
            raise StepsError(f"{name}: row {i}: {msg}") from None
        target = "generate_s" if plan.task == "generate" else "step_s"
        s = v.get(target, "")
        if not s:
            kind = "generate" if target == "generate_s" else "training"
            raise StepsError(f"{name}: row {i}, column {target}: missing (the measured target of a {kind} row)")
        measured = float(s)
        if measured <= 0:
            raise StepsError(f"{name}: row {i}, column {target}: must be > 0 (got {s!r})")
        if plan.model not in models:
            try:
                models[plan.model] = load_model(plan.model)
            except ValueError as e:
                raise StepsError(f"{name}: row {i}, column model: {one_line(e).removeprefix('model: ')}") from None
        gpu = None
        if plan.gpu:
            if plan.gpu not in gpus:
                try:
                    gpus[plan.gpu] = load_gpu(plan.gpu)
                except ValueError as e:
                    raise StepsError(f"{name}: row {i}, column gpu: {one_line(e).removeprefix('gpu: ')}") from None
            gpu = gpus[plan.gpu]
        out.append(StepRow(i, _label(i, v, plan), plan, models[plan.model], gpu, target, measured))
    return out


@dataclass(frozen=True)
class FitRow:
    label: str
    target: str
    measured: float
    predicted: float

    @property
    def error(self) -> float:
        """predicted / measured - 1 (the profile's `residuals` keep measured / predicted - 1)."""
        return self.predicted / self.measured - 1


@dataclass
class FitResult:
    profile: DeviceProfile
    params: dict[str, float]
    base: dict[str, float]
    rows: list[FitRow]
    objective: float
    evaluations: int

    @property
    def median_abs_error(self) -> float:
        return _median([abs(r.error) for r in self.rows])

    @property
    def worst_abs_error(self) -> float:
        return max(abs(r.error) for r in self.rows)


def nelder_mead(f: Callable[[list[float]], float], x0: Sequence[float], step: Sequence[float],
                max_evals: int = 600, ftol: float = 1e-14, xtol: float = 1e-10) -> tuple[list[float], float, int]:  # fmt: skip
    """Minimise f from x0 (standard coefficients 1, 2, 0.5, 0.5); returns (x, f(x), evaluations)."""
    n = len(x0)
    evals = 0

    def call(x: list[float]) -> float:
        nonlocal evals
        evals += 1
        y = f(x)
        return y if math.isfinite(y) else float("inf")

    simplex = [list(map(float, x0))]
    for i in range(n):
        x = list(map(float, x0))
        x[i] += step[i]
        simplex.append(x)
    values = [call(x) for x in simplex]
    while evals < max_evals:
        order = sorted(range(n + 1), key=lambda j: values[j])
        simplex, values = [simplex[j] for j in order], [values[j] for j in order]
        size = max(max(abs(simplex[j][i] - simplex[0][i]) for i in range(n)) for j in range(1, n + 1))
        if abs(values[-1] - values[0]) <= ftol * (abs(values[0]) + 1e-30) + 1e-300 and size <= xtol or size <= 1e-15:
            break
        centroid = [sum(simplex[j][i] for j in range(n)) / n for i in range(n)]
        worst = simplex[-1]
        xr = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = call(xr)
        if fr < values[0]:
            xe = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = call(xe)
            simplex[-1], values[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = xr, fr
        else:
            if fr < values[-1]:
                xc = [c + 0.5 * (r - c) for c, r in zip(centroid, xr)]
            else:
                xc = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = call(xc)
            if fc < min(fr, values[-1]):
                simplex[-1], values[-1] = xc, fc
            else:  # shrink towards the best
                best = simplex[0]
                for j in range(1, n + 1):
                    simplex[j] = [b + 0.5 * (x - b) for b, x in zip(best, simplex[j])]
                    values[j] = call(simplex[j])
    j = min(range(n + 1), key=lambda k: values[k])
    return simplex[j], values[j], evals


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """a x = b by Gaussian elimination with partial pivoting (None when singular)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            k = m[r][c] / m[c][c]
            for j in range(c, n + 1):
                m[r][j] -= k * m[c][j]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][j] * x[j] for j in range(r + 1, n))) / m[r][r]
    return x


def levenberg_marquardt(residuals: Callable[[list[float]], list[float]], x0: Sequence[float],
                        max_evals: int = 300, lower: float = 0.0) -> tuple[list[float], float, int]:  # fmt: skip
    """Minimise sum(residuals(x)^2) with x >= lower: Levenberg-Marquardt, forward-difference Jacobian,
    steps projected onto the bound; returns (x, sum of squares, evaluations)."""
    evals = 0

    def res(x: list[float]) -> list[float]:
        nonlocal evals
        evals += 1
        return [v if math.isfinite(v) else 1e3 for v in residuals(x)]

    x = [max(float(v), lower) for v in x0]
    r = res(x)
    f = sum(v * v for v in r)
    lam = 1e-3
    n = len(x)
    while evals + n + 1 <= max_evals and f > 1e-30:
        jac = []
        for j in range(n):
            h = 1e-6 * max(abs(x[j]), 1e-2)
            xh = x[:]
            xh[j] += h
            jac.append([(a - b) / h for a, b in zip(res(xh), r)])  # column j
        a = [[sum(ci * cj for ci, cj in zip(jac[i], jac[j])) for j in range(n)] for i in range(n)]
        g = [sum(ci * ri for ci, ri in zip(jac[i], r)) for i in range(n)]
        improved = False
        while evals < max_evals and lam < 1e12:
            damped = [[a[i][j] + (lam * max(a[i][i], 1e-12) if i == j else 0.0) for j in range(n)] for i in range(n)]
            step = _solve(damped, [-v for v in g])
            if step is None:
                lam *= 10
                continue
            xn = [max(xi + si, lower) for xi, si in zip(x, step)]
            rn = res(xn)
            fn = sum(v * v for v in rn)
            if fn < f:
                moved = max(abs(p - q) / max(abs(q), 1e-2) for p, q in zip(xn, x))
                x, r, f_old, f = xn, rn, f, fn
                lam = max(lam / 3, 1e-12)
                improved = True
                break
            lam *= 4
        if not improved or moved < 1e-12 or f_old - f <= 1e-15 * f_old:
            break
    return x, f, evals


LEAST = 1e-9  # the smallest fraction of its starting value a fitted parameter takes (fit_profile)


def fit_profile(base: DeviceProfile, rows: Sequence[StepRow], predict: Predict,
                params: Sequence[str] = DEFAULT_FIT, max_evals: int = 1500, csv_name: str = "steps.csv",
                progress: Callable[[int, int], None] | None = None) -> FitResult:  # fmt: skip
    """Fit `params` (dotted float fields of the profile, > 0) so that `predict(plan, model, profile, gpu)`
    matches each row's target: Levenberg-Marquardt on the log residuals log(predicted / measured), in
    units of each parameter's base value, from several starts, then Nelder-Mead from the best point
    (kinks of max(host, device)); the best point wins. `max_evals` bounds the evaluations (each
    predicts every row); `progress(evaluations, max_evals)` is told of each."""
    params = parse_fit_params(list(params))
    if not rows:
        raise StepsError(f"{csv_name}: no rows to fit")
    start = {p: get_param(base, p) for p in params}
    scale = {p: (v if v > 0 else 1e-6) for p, v in start.items()}
    budget = max_evals

    def values_of(x: Sequence[float]) -> dict[str, float]:
        # bounded above zero: a profile's scales must be positive (fixed_scale, device_scale); a figure
        # at LEAST of its starting value is nothing in effect (a fit on a contended machine drove
        # fixed_scale to 0.0, and the fitted profile failed its own validation)
        return {p: max(xi, LEAST) * scale[p] for p, xi in zip(params, x)}

    def predictions(profile: DeviceProfile) -> list[float]:
        out = []
        for r in rows:
            try:
                out.append(float(predict(r.plan, r.model, profile, r.gpu)))
            except PlannerInputError as e:
                raise StepsError(f"{csv_name}: row {r.row}: {one_line(e)}") from None
        return out

    total_evals = [0]

    def log_residuals(x: list[float]) -> list[float]:
        total_evals[0] += 1
        if progress is not None:
            progress(min(total_evals[0], budget), budget)
        prof = with_params(base, values_of(x))
        return [math.sqrt(r.weight) * math.log(p / r.measured) if p > 0 and math.isfinite(p) else 1e3
                for r, p in zip(rows, predictions(prof))]  # fmt: skip

    def objective(x: list[float]) -> float:
        # outside the bounds: the clamped point's value, plus a slope back towards them
        return sum(v * v for v in log_residuals(x)) + sum(xi * xi for xi in x if xi < 0)

    # max(host, device) makes the residuals kinked and the sum of squares can have local minima:
    # Levenberg-Marquardt from several starts (the base point, all parameters x 1/4 and x 4, each one
    # alone x 1/4 and x 4), then Nelder-Mead from the best point; the best point wins
    x0 = [start[p] / scale[p] for p in params]
    unit = [v if v > 0 else 1.0 for v in x0]
    starts = [x0, [u / 4 for u in unit], [u * 4 for u in unit]]
    for i in range(len(params)):
        for k in (0.25, 4.0):
            starts.append([u * k if j == i else v for j, (u, v) in enumerate(zip(unit, x0))])
    per = max(4 * (len(params) + 1), int(0.8 * budget) // len(starts))
    x, fx, evals, stale = list(x0), math.inf, 0, 0
    for k, s0 in enumerate(starts):
        if evals >= 0.8 * budget or fx < 1e-24 or (k >= 3 and stale >= 2):
            break  # the budget is spent, the fit is exact, or two starts in a row found nothing better
        xs, fs, e = levenberg_marquardt(log_residuals, s0, max_evals=min(per, budget - evals))
        evals += e
        stale = 0 if fs < fx * (1 - 1e-6) else stale + 1
        if fs < fx:
            x, fx = xs, fs
    if fx > 1e-20 and budget - evals > 2 * (len(params) + 1):
        step = [max(abs(xi) * 0.1, 0.02) for xi in x]
        xn, fn, more = nelder_mead(objective, x, step, max_evals=budget - evals)
        evals += more
        if fn < fx:
            x, fx = [max(v, LEAST) for v in xn], fn
    fitted = values_of(x)
    profile = with_params(base, fitted)
    preds = predictions(profile)
    fit_rows = [FitRow(r.label, r.target, r.measured, p) for r, p in zip(rows, preds)]
    res = {fr.label: (fr.measured / fr.predicted - 1 if fr.predicted > 0 else float("inf")) for fr in fit_rows}
    result = FitResult(profile, fitted, start, fit_rows, fx, evals)
    targets = sorted({r.target for r in rows})
    how = (f"fitted to {csv_name} ({len(rows)} rows; targets {', '.join(targets)}) by Levenberg-Marquardt from "
           f"{len(starts)} starts, then Nelder-Mead, on the sum of squared log(predicted / measured), bounded "
           f"> 0, {result.evaluations} evaluations; base profile {base.id}; median |error| {result.median_abs_error:.1%}, worst {result.worst_abs_error:.1%}")
    sources = dict(base.sources)
    for p in params:
        sources[p] = f"{how}; from {start[p]:.4g} (base: {base.sources.get(p, 'no source')})"
    sources["fit"] = f"{how}; on {datetime.date.today().isoformat()}; parameters {', '.join(params)}"
    profile = profile.model_copy(update={"residuals": {k: (v if math.isfinite(v) else 1e308) for k, v in res.items()},
                                         "sources": sources, "id": f"{base.id}-fit",
                                         "name": f"{base.name} (fitted to {Path(csv_name).name})"})  # fmt: skip
    result.profile = DeviceProfile.model_validate(profile.model_dump())
    return result


# ---- host costs fitted to whole programs (the step fit) ---------------------------------------------
# What the micro-benchmarks cannot see: transformers' own Python per model forward (output capture,
# the mask functions), per decoder layer (the attention interface, kwargs, decorators), per module
# beyond nn.Module.__call__ (peft's LoRA forward), per generate() step. These are fitted to whole
# steps of a built-in set of tiny, host-bound programs, timed here (planner.backends.step_programs)
# and predicted by the engine (planner.engine.timing.step_time) with the profile being built.
# backward_op_s as well: the micro-benchmark's chain of muls (one op a node, nothing saved beyond
# its inputs) costs less per op than a model's backward, whose nodes unpack saved tensors and run
# several ops each; priced at the chain's figure, the calibration sft steps come out ~20% short
# while the no-grad forwards come out ~15% long.
# generate_call_s (a generate() call's own Python before its first forward) beside generate_step_s:
# two generate programs with other numbers of new tokens tell them apart.
# dtype_scale.fp32 and .bf16 as well: a program's matmul and attention kernels find their operands
# further away than a sweep's (which cycles through 8 MiB of copies: beyond L2, inside this EPYC's 32
# MiB L3), and the interpreter's work between them evicts what they left; two medium programs (hidden
# 192, 512 tokens, fp32 and bf16: compute-bound, their step's tensors beyond the L3) measure that
# fraction, one per dtype: fast fp32 kernels lose more to it than this CPU's slow bf16 ones (with
# one device_scale over both, 2026-12-07: the fp32 medium program 10% short and the bf16 one 11%
# long, device_scale 1.16; the time validation's fp32 cases 12-42% short). Priced at the sweeps'
# rates, the time validation of 2026-12-03 had its compute-bound cases 12.5% short (median).
STEP_FIT = ("fixed_scale", "host.backward_op_s", "host.layer_s", "host.model_s", "host.generate_step_s",
            "host.generate_call_s", "dtype_scale.fp32", "dtype_scale.bf16")
# fixed_scale (one factor on every per-op fixed cost the hot loops measured: op dispatch, module call,
# kernel fixed, matmul fixed) replaced fitting module_s and matmul_fixed_s.fp32/.bf16 one by one
# (backward_op_s stays fitted: the autograd engine's per-node work in a model is not the chain's): a program's small ops cost 1.5-3x their hot loops' figures (a TorchDispatchMode timing
# each op inside generate fp32 llama-2x64 b4 p64+32, 2026-12-07: mul 1.9x, add 1.6x, mean 2.7x), and
# with each of those fitted on its own the fit put that into module_s (25 us a module call, against
# 1-8 us measured) and model_s (0.95 ms a forward), which priced the generate programs 28-64% high.
# device_scale (every curve, memory included) is not fitted by default: beside dtype scales it is
# degenerate with them (a fit of 2026-12-03 drove it to 2.28 and the compute scales to 0.30 / 0.23);
# `--from-steps ... --fit device_scale` fits it to other steps.
# What only the full set's programs tell apart (the quick set leaves them as they are):
FULL_ONLY = ("dtype_scale.fp32", "dtype_scale.bf16")
STEP_START = {"host.layer_s": 30e-6, "host.model_s": 300e-6, "host.module_s": 3e-6, "host.generate_step_s": 100e-6,
              "host.generate_call_s": 500e-6, "device_scale": 1.0, "fixed_scale": 1.5, "matmul_fixed_s.fp32": 1e-6,
              "matmul_fixed_s.bf16": 5e-6, "dtype_scale.fp32": 1.0, "dtype_scale.bf16": 1.0}
CALIBRATION_NEW_TOKENS = (8, 2)  # the generate programs' new tokens
# the calibration models: llama, hidden 32 (4 heads of 8, 2 KV heads), MLP 64, vocabulary 256, bf16;
# their programs batch 1 x 8 tokens (the time validation's programs have other shapes)
CALIBRATION_MODEL = dict(hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=256)
CALIBRATION_TOKENS = (1, 8)  # batch, seq (generate: the prompt)
# the medium, compute-bound programs (dtype_scale.fp32, .bf16), each an sft full step in fp32 and in bf16:
# llama, 2 layers of hidden 192 (6 heads of 32, 2 KV heads), MLP 512, vocabulary 3000, batch 4 x 128
# tokens; and 2 layers of hidden 512 (8 heads of 64), MLP 1024, vocabulary 2048, batch 2 x 64 tokens. Two
# shapes, so that a dtype's scale is not fitted to one program, one with sizes of 3 x a power of 2 and
# one of powers of 2 (LLMs' are multiples of large powers of 2): on this CPU the bf16 grad-input matmul
# runs 0.6-0.8x its shape model's time at K = 384 and 1.0-1.3x at K = 128 (2026-12-07), more than the
# model follows (planner.profiles.MatmulShapes); a scale fitted to the 192 and 384 programs alone was
# 1.20-1.24 in three runs, and priced the power-of-2 validation programs 22% short
CALIBRATION_MEDIUM = (dict(layers=2, hidden=192, intermediate=512, heads=6, kv_heads=2, vocab=3000, batch=4, seq=128),
                      dict(layers=2, hidden=512, intermediate=1024, heads=8, kv_heads=2, vocab=2048, batch=2, seq=64))


def calibration_cases(root: str | Path, which: str = "full") -> list[Any]:
    """The built-in calibration programs (planner.backends.step_programs.Case), their models'
    config.json files written under `root`: a no-grad forward and a full sft step of 1, 2 and 4
    layers, a LoRA (r 4) sft step of 2 layers, two generate calls of 2 layers (8 and 2 new tokens:
    generate_step_s and generate_call_s apart) and one of 4 layers, the 2-layer forward, sft step and
    generate in fp32 (matmul_fixed_s of both dtypes), and the medium sft steps (CALIBRATION_MEDIUM, two
    shapes, fp32 and bf16: the dtype scales); `quick`: 1 and 4 layers, no deeper generate,
    no medium programs."""
    from planner.backends.step_programs import FORWARD, Case, llama_config, write_config
    from planner.specs import Plan

    quick = which == "quick"
    layers = (1, 4) if quick else (1, 2, 4)
    m = CALIBRATION_MODEL
    paths = {n: write_config(root, f"calibration-llama-{n}x{m['hidden']}",
                             llama_config(n, m["hidden"], m["intermediate"], m["heads"], m["kv_heads"], m["vocab"]))
             for n in sorted({*layers, 2})}  # fmt: skip
    b, s = CALIBRATION_TOKENS
    cases = []
    for n in layers:
        cases.append(Case(f"calibration forward {n}x{m['hidden']} b{b} s{s}", Plan(model=paths[n], batch=b, seq=s),
                          FORWARD, steps=5, warmup=2))
    for n in layers:
        cases.append(Case(f"calibration sft full {n}x{m['hidden']} b{b} s{s}", Plan(model=paths[n], batch=b, seq=s),
                          steps=5, warmup=2))
    cases.append(Case(f"calibration sft lora r4 2x{m['hidden']} b{b} s{s}",
                      Plan(model=paths[2], batch=b, seq=s, method="lora", lora_rank=4), steps=5, warmup=2))
    for new in CALIBRATION_NEW_TOKENS:
        cases.append(Case(f"calibration generate 2x{m['hidden']} b{b} p{s}+{new}",
                          Plan(model=paths[2], task="generate", batch=b, prompt_len=s, new_tokens=new), steps=3,
                          warmup=1))  # fmt: skip
    if quick:
        return cases
    # a deeper generate (decode's per-layer against its per-forward Python) and the medium programs
    new = CALIBRATION_NEW_TOKENS[0]
    cases.append(Case(f"calibration generate 4x{m['hidden']} b{b} p{s}+{new}",
                      Plan(model=paths[4], task="generate", batch=b, prompt_len=s, new_tokens=new), steps=3, warmup=1))
    # the same tiny programs in fp32 (the matmul fixed costs of the two dtypes apart)
    cases.append(Case(f"calibration forward fp32 2x{m['hidden']} b{b} s{s}",
                      Plan(model=paths[2], batch=b, seq=s, precision="fp32"), FORWARD, steps=5, warmup=2))
    cases.append(Case(f"calibration sft full fp32 2x{m['hidden']} b{b} s{s}",
                      Plan(model=paths[2], batch=b, seq=s, precision="fp32"), steps=5, warmup=2))
    cases.append(Case(f"calibration generate fp32 2x{m['hidden']} b{b} p{s}+{new}",
                      Plan(model=paths[2], task="generate", batch=b, prompt_len=s, new_tokens=new, precision="fp32"),
                      steps=3, warmup=1))  # fmt: skip
    for md in CALIBRATION_MEDIUM:
        path = write_config(root, f"calibration-llama-{md['layers']}x{md['hidden']}",
                            llama_config(md["layers"], md["hidden"], md["intermediate"], md["heads"], md["kv_heads"],
                                         md["vocab"]))  # fmt: skip
        for precision in ("fp32", "bf16"):
            cases.append(Case(f"calibration sft full {precision} {md['layers']}x{md['hidden']} b{md['batch']} "
                              f"s{md['seq']}", Plan(model=path, batch=md["batch"], seq=md["seq"], precision=precision),
                              steps=3, warmup=1))  # fmt: skip
    return cases


def step_fit_params(which: str) -> tuple[str, ...]:
    """The parameters the step fit fits on `which` programs: the quick set has no compute-bound
    program to tell the dtype scales by, so FULL_ONLY stay as they are there."""
    return tuple(p for p in STEP_FIT if which != "quick" or p not in FULL_ONLY)


@dataclass
class StepFit:
    """The profile with its step-fitted host costs, the programs it was fitted on (their samples),
    the fit (rows: measured against predicted), and the seconds it took."""

    profile: DeviceProfile
    cases: list[Any]
    fit: FitResult | None
    elapsed_s: float
    note: str = ""


def step_fit_available() -> str:
    """'' when the step fit can run here, else why not (one line)."""
    import importlib.util

    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (the backends extra)" if missing else ""


# figures the micro-benchmarks measured that a fit may raise but not lower: the bare nn.Module call,
# the backward of a chain of single-op nodes (what a program's Python adds comes on top)
FLOORED = ("host.module_s", "host.backward_op_s")
# and fixed_scale's floor, 1: a program's ops cost at least their hot loops' fixed figures (they cost
# 1.5-3x them, measured op by op: STEP_FIT's note). Unfloored, the step fit of 2026-12-07 (spreads up to
# 90% on this shared machine) traded it against backward_op_s: fixed_scale 0.22 (every op's dispatch at
# a fifth of its loop's figure) with backward_op_s 65 us (15x the chain's 4.4 us); the run before, 0.66
# with 15 us. Floored, the same programs' medians refitted: backward_op_s 11.5 us, median |error| 5.7%
# (4.9% unfloored), and the time validation's cases repriced: median 8.5% and worst 21.3% (8.2%, 23.6%)
FLOOR_AT = {"fixed_scale": 1.0}


def fit_cases(profile: DeviceProfile, cases: Sequence[Any], params: Sequence[str] = STEP_FIT, max_evals: int = 600,
              progress: Progress | None = None) -> tuple[FitResult, list[str], dict[str, float], dict[str, float]]:  # fmt: skip
    """Fit `params` of `profile` to the cases' figures (planner.backends.step_programs.Case, timed: the
    mean of its samples),
    predicted by planner.engine.timing.step_time: `fit_profile`. A FLOORED parameter the fit puts
    below its micro-benchmark figure is held there and the others fitted again. Returns the fit,
    the parameters fitted, those held (with their values) and the starting values."""
    from planner.engine.timing import step_time

    workloads = {id(c.plan): c.workload() for c in cases}
    # each program weighted by the precision of its figure: 1 / spread^2 (spread: (max - min) / median of
    # its samples, at least 10%), normalised to a mean of 1; on this shared machine a tiny program's
    # samples spread 13-76% in one run, and the noisiest ones pulled the host costs where the steadier
    # programs did not fit
    raw = [1.0 / max(_spread_of(c.samples) if len(c.samples) > 1 else 0.1, 0.1) ** 2 for c in cases]
    mean = sum(raw) / len(raw) if raw else 1.0
    rows = [StepRow(i, c.label, c.plan, c.model, None, "step_s", c.figure, w / mean)
            for i, (c, w) in enumerate(zip(cases, raw), start=1)]

    def predict_row(plan: Any, model: Any, prof: DeviceProfile, gpu: Any) -> float:
        return step_time(workloads[id(plan)], prof).total_s

    floor = {p: get_param(profile, p) for p in params if p in FLOORED and get_param(profile, p) > 0}
    floor |= {p: v for p, v in FLOOR_AT.items() if p in params}
    free, held = list(params), {}
    while True:
        start = {p: max(get_param(profile, p), STEP_START.get(p, 0.0)) or 1e-6 for p in free}
        fit = fit_profile(with_params(profile, {**held, **start}), rows, predict_row, free, max_evals=max_evals,
                          csv_name="calibration programs",
                          progress=(lambda d, t: progress("fit", d, t)) if progress is not None else None)  # fmt: skip
        low = [p for p in free if p in floor and fit.params[p] < floor[p]]
        if not low or len(low) == len(free):
            return fit, free, held, start
        for p in low:
            held[p] = floor[p]
            free.remove(p)


def fit_host_to_steps(profile: DeviceProfile, rounds: int = 5, which: str = "full", threads: int | None = 1,
                      progress: Progress | None = None, params: Sequence[str] = STEP_FIT,
                      max_evals: int = 600) -> StepFit:  # fmt: skip
    """Time the built-in calibration programs (`calibration_cases`, `rounds` interleaved rounds,
    threads=1 by default) and fit `params` of `profile` so that planner.engine.timing.step_time
    reproduces them: `fit_profile` (least squares on log(predicted / measured)). The fitted figures'
    sources say what they were fitted on; `residuals` hold measured / predicted - 1 per program."""
    import tempfile

    from planner.backends.step_programs import time_cases

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="planner-calibration-") as root:
        cases = calibration_cases(root, which)
        time_cases(cases, rounds, threads=threads, progress=progress, stage="calibration programs")
        return fit_timed_cases(profile, cases, rounds, threads, params, max_evals, progress, started)


def fit_timed_cases(profile: DeviceProfile, cases: Sequence[Any], rounds: int, threads: int | None,
                    params: Sequence[str] = STEP_FIT, max_evals: int = 600, progress: Progress | None = None,
                    started: float | None = None, note: str = "") -> StepFit:  # fmt: skip
    """The step fit of `fit_host_to_steps` on calibration programs already timed (their `samples`
    set; the time validation times them interleaved with its cases, so that a drift of this
    machine's speed between the two hits both alike); `note` is added to the sources. Call it while
    the programs' config.json files exist: their model specs are read here."""
    import torch

    for c in cases:
        _ = c.model  # the specs are read now (the fit runs on them after the files are gone)

    started = time.perf_counter() if started is None else started
    fit, free, held, start = fit_cases(profile, cases, params, max_evals=max_evals, progress=progress)
    threads = threads or torch.get_num_threads()
    spreads = [c.spread for c in cases]
    names = "; ".join(f"{c.label}: {_fmt_s(c.figure)} (spread {c.spread:.0%})" for c in cases)
    how = (f"fitted to {len(cases)} built-in calibration programs timed on this machine with "
           f"planner.backends.timing.time_steps (threads {threads}; each sample the median of one call's steps "
           f"after its warm-up; the mean of the samples of {rounds} interleaved rounds, spreads median "
           f"{_median(spreads):.0%}, worst "
           f"{max(spreads):.0%}) and predicted by planner.engine.timing.step_time with this profile; "
           f"fit_profile: least squares on log(predicted / measured), {fit.evaluations} evaluations, "
           f"median |error| {fit.median_abs_error:.1%}, worst {fit.worst_abs_error:.1%}{note}")
    sources = dict(profile.sources)
    for p in free:
        before = get_param(profile, p)
        was = (f"; the micro-benchmark's {_fmt_param(p, before)} ({profile.sources.get(p, '')})"
               if before > 0 and "scale" not in p else "")
        sources[p] = f"{how}; from {_fmt_param(p, start[p])}{was}"
    for p, v in held.items():
        sources[p] = (f"{profile.sources.get(p, 'micro-benchmark')}; held at {_fmt_param(p, v)}, its floor (the "
                      f"micro-benchmarks' figure{': 1, their fixed costs as measured' if p in FLOOR_AT else ''}): the step fit, "
                      f"{how}, wanted less")
    sources["step fit"] = (f"parameters {', '.join(free)} {how}"
                           + (f"; {', '.join(held)} held at their floor (the micro-benchmarks' figures)" if held else "")
                           + f"; programs (llama-family, hidden {CALIBRATION_MODEL['hidden']}, vocabulary "
                           f"{CALIBRATION_MODEL['vocab']}, bf16): {names}")
    out = fit.profile.model_copy(update={"id": profile.id, "name": profile.name, "sources": sources})
    out = DeviceProfile.model_validate(out.model_dump())
    fit.profile = out
    return StepFit(out, cases, fit, time.perf_counter() - started)
