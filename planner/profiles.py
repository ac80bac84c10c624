"""Device profiles: what one device achieves, measured on it or built from public figures, with sources.

The time model (planner.engine.cost) prices every op of the replayed program with a profile:
- device time of an op = launch_s + max(FLOPs / rate(FLOPs), bytes / memory rate(bytes)) for
  matmuls and attention (rates by dtype: `matmul`, by dtype and operand layout where measured
  `matmul_layouts`, against a Linear layer's shape (M, K, N) where measured `matmul_shapes`,
  `attention` for SDPA forward, `attention_backward` for its backward),
  launch_s + bytes / memory rate(bytes) for the others (`memory_inplace` for in-place ones), or
  launch_s + fixed + bytes / its own rate(bytes) for a kernel measured on its own (`kernels`: on a
  CPU log_softmax, silu or mean cost more per byte than a copy); a `_foreach_*` op is one kernel over its list, or one per tensor where
  `foreach_per_tensor` (the CPU's fallback);
- host time of an op = host.op_s (an op that runs a kernel: framework dispatch + launch) or
  host.view_s (a metadata-only op: view, transpose, detach...), plus host.module_s per nn.Module call,
  plus the fixed Python of calls that dispatch no op (HostCosts: layer_s, model_s, loss_s,
  backward_call_s, optimizer_step_s, generate_call_s, generate_step_s, saved_hook_s, checkpoint_s,
  attention_plan_s);
- `asynchronous` devices (CUDA) let the host run ahead of the device until a synchronisation, so a
  stretch between two syncs costs max(host, device); synchronous ones (the CPU) cost host + device.

Rates are curves of achieved FLOP/s (bytes/s) against the op's size, because small ops reach a
fraction of what large ones do (launch-bound kernels, caches): points (size, rate), interpolated
linearly in log(size), flat beyond the end points.

A profile comes from `planner calibrate` (micro-benchmarks on the local machine), from
`planner calibrate --from-steps` (a few parameters fitted to whole-step measurements), or ships in
planner/data/profiles/ with the source of every figure (`sources`). Units: seconds, FLOP/s, bytes/s.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from planner.errors import PlannerInputError, did_you_mean

DTYPES = ("fp32", "bf16", "fp16")
# the three matmuls of a Linear layer, by their operands' layout: the forward F.linear(x[M,K], w[N,K])
# (mm(x, w.t()): the second operand transposed), autograd's grad input grad[M,N].mm(w[N,K]) (both
# contiguous) and grad weight grad.t()[N,M].mm(x[M,K]) (the first transposed)
MATMUL_LAYOUTS = ("linear", "grad_input", "grad_weight")
# an SDPA kernel's passes, each with its own shape model: the forward kernel over a causal prefill, the
# forward kernel of a decode step (one query row over the cache), autograd's backward kernel (FLOPs 2.5x)
ATTENTION_PASSES = ("forward", "decode", "backward")


def attention_pass(backward: bool, queries: int) -> str:
    """The ATTENTION_PASSES entry of an SDPA kernel (its backward kernel, or the forward) over `queries`
    query rows per sequence and head (1: a decode step)."""
    if backward:
        return "backward"
    return "decode" if queries == 1 else "forward"


class ProfileError(PlannerInputError):
    """A profile that cannot be used; the message is one line naming the field."""


class RateCurve(BaseModel):
    """Achieved rate against op size: `points` = [(size, rate), ...], sizes ascending and > 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    points: tuple[tuple[float, float], ...] = Field(min_length=1)

    @field_validator("points")
    @classmethod
    def _check(cls, pts: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        for size, rate in pts:
            if not (size > 0 and rate > 0 and math.isfinite(size) and math.isfinite(rate)):
                raise ValueError(f"every (size, rate) point must be positive and finite (got ({size}, {rate}))")
        sizes = [p[0] for p in pts]
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError("sizes must be strictly ascending")
        return pts

    def scaled(self, k: float) -> RateCurve:
        """The curve with every rate times k."""
        return RateCurve(points=tuple((size, rate * k) for size, rate in self.points))

    def rate(self, size: float) -> float:
        """The rate at `size`: linear in log(size) between points, flat beyond them."""
        pts = self.points
        if size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            return pts[-1][1]
        sizes, logs = _prepared(pts)
        i = bisect.bisect_right(sizes, size)
        r0, r1 = pts[i - 1][1], pts[i][1]
        w = (math.log(size) - logs[i - 1]) / (logs[i] - logs[i - 1])
        return r0 + w * (r1 - r0)

    def seconds(self, size: float) -> float:
        """size / rate(size)."""
        return size / self.rate(size) if size > 0 else 0.0


# the terms a MatmulShapes model may sum: the layer's M (tokens), K (in), N (out), the sizes of the
# three matrices of its matmuls (M*K the input, K*N the weight, M*N the output: caches fill by size),
# and the largest powers of 2 that divide K and N (k2, n2: a row stride of a large power of 2 maps the
# rows a kernel walks down onto few cache sets)
SHAPE_TERMS = ("m", "k", "n", "mk", "kn", "mn", "k2", "n2")


def pow2_part(x: float) -> float:
    """The largest power of 2 dividing a positive integer x (1 for anything else)."""
    i = int(x)
    return float(i & -i) if i > 0 and i == x else 1.0


def shape_sizes(m: float, k: float, n: float) -> dict[str, float]:
    """Each SHAPE_TERMS term's size for a Linear layer of M tokens, K in, N out."""
    return {"m": m, "k": k, "n": n, "mk": m * k, "kn": k * n, "mn": m * n, "k2": pow2_part(k), "n2": pow2_part(n)}


class MatmulShapes(BaseModel):
    """Achieved FLOP/s of one of a Linear layer's matmuls (one layout, one dtype) against the layer's
    shape: M tokens, K in_features, N out_features (for every layout the layer's, not the mm's own):

        rate(M, K, N) = exp(log_rate + sum over terms t of g_t(log size_t))

    size_t one of M, K, N, M*K, K*N, M*N and the powers of 2 dividing K and N (SHAPE_TERMS); each g_t
    piecewise linear in log(size) between
    its points (size, log-rate offset) and flat beyond them. An efficiency that is a product of factors
    of the shape: a kernel's tiles or dot products fill unevenly along each dimension (on a CPU without
    native bf16, at::native's bf16 forward kernel runs one dot product of length K per output: 6 GFLOP/s
    at K = 128, 10.5 at K = 1024, whatever M and N), and an operand's size sets which cache it streams
    from (its grad input kernel: 3 GFLOP/s while the K*N weight fits 64 kB, 0.4 at 8 MB), and a row stride
    of a large power of 2 thrashes a few cache sets (that kernel at M = 512, N = 3000: 2.4 GFLOP/s at
    K = 160 = 2^5 * 5, 1.5 at K = 128, 0.8 at K = 256, 2026-12-07). A layer timed itself (`measured`:
    `planner calibrate --model`) adds its own offset: the smooth terms leave single shapes 30-70% off
    (that kernel at K = 256, N = 2048-8000 took 1.4-1.8x its modelled time at M = 16-1024). Fitted by least
    squares on log(rate) to a sweep of shapes, the terms and smoothing chosen by leave-one-out error
    (planner.backends.calibrate.fit_matmul_shapes); `points` shapes, `residual` the median
    |measured / fitted - 1| of their rates, `loo` the median leave-one-out error of their times.

    An SDPA kernel is priced by the same model (DeviceProfile.attention_shapes) as the matmul it is
    shaped like: M = FLOPs / (2 K N) query rows (B x heads x (S + 1) for a causal prefill of S, 2 x B x
    heads for a decode step), K the head dim, N the key length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    log_rate: float = Field(description="log of FLOP/s where every g is 0")
    terms: dict[str, tuple[tuple[float, float], ...]] = Field(min_length=1, description=(
        "per term (m, k, n, mk, kn, mn): points (size, log-rate offset), sizes ascending and > 0"))
    points: int = Field(default=0, ge=0, description="shapes it was fitted to")
    residual: float = Field(default=0.0, ge=0, description="median |measured / fitted - 1| over them")
    loo: float = Field(default=0.0, ge=0, description="median leave-one-out |predicted / measured time - 1|")
    smoothing: float = Field(default=0.0, ge=0, description="the fit's penalty on neighbouring offsets' differences")
    measured: dict[str, float] = Field(default_factory=dict, description=(
        "per Linear layer 'KxN' (in x out features) timed itself: a log-rate offset on top of the terms "
        "(the mean of log(measured / modelled rate) over its timed shapes), for every M"))

    @field_validator("log_rate")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite (got {v})")
        return v

    @field_validator("measured")
    @classmethod
    def _measured(cls, v: dict[str, float]) -> dict[str, float]:
        for key, off in v.items():
            k, _, n = key.partition("x")
            if not (k.isdigit() and n.isdigit() and int(k) > 0 and int(n) > 0):
                raise ValueError(f"measured: '{key}' is not 'KxN' (two positive integers)")
            if not math.isfinite(off):
                raise ValueError(f"measured: {key}: the offset must be finite")
        return v

    @field_validator("terms")
    @classmethod
    def _terms(cls, v: dict[str, tuple[tuple[float, float], ...]]) -> dict[str, tuple[tuple[float, float], ...]]:
        for name, pts in v.items():
            if name not in SHAPE_TERMS:
                raise ValueError(f"unknown term '{name}' (allowed: {', '.join(SHAPE_TERMS)})")
            if not pts:
                raise ValueError(f"{name}: give at least one (size, offset) point")
            sizes = [p[0] for p in pts]
            if not all(x > 0 and math.isfinite(x) for x in sizes) or any(b <= a for a, b in zip(sizes, sizes[1:])):
                raise ValueError(f"{name}: sizes must be positive, finite and strictly ascending")
            if not all(math.isfinite(p[1]) for p in pts):
                raise ValueError(f"{name}: offsets must be finite")
        return v

    def scaled(self, factor: float) -> MatmulShapes:
        """Every rate times `factor`."""
        return self.model_copy(update={"log_rate": self.log_rate + math.log(factor)})

    def log_offset(self, name: str, size: float) -> float:
        """g_name(log size): 0 for a term the model does not have."""
        pts = self.terms.get(name)
        if not pts:
            return 0.0
        logs, values = _term_arrays(pts)
        return piecewise(logs, values, size)

    def seconds(self, flops: float, dims: tuple[int, int]) -> float:
        """flops / rate of a Linear layer's matmul of (K, N) = dims: M = flops / (2 K N)."""
        k, n = dims
        return flops / self.rate(flops / (2.0 * k * n), k, n)

    def rate(self, m: float, k: float, n: float) -> float:
        sizes = shape_sizes(m, k, n)
        own = self.measured.get(f"{int(k)}x{int(n)}", 0.0) if self.measured else 0.0
        return math.exp(self.log_rate + own + sum(self.log_offset(t, sizes[t]) for t in self.terms))


@lru_cache(maxsize=1024)
def _term_arrays(pts: tuple[tuple[float, float], ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(math.log(p[0]) for p in pts), tuple(p[1] for p in pts)


def hat_weights(logs: Sequence[float], size: float) -> tuple[int, float]:
    """Where log(size) falls among the knots (logs, ascending): (i, w) with the value (1 - w) x v[i - 1]
    + w x v[i], linear between the knots and flat beyond them (i = 1, w = 0 below the first; w = 1 at
    and beyond the last)."""
    x = math.log(size) if size > 0 else logs[0]
    if x <= logs[0]:
        return 1, 0.0
    if x >= logs[-1]:
        return len(logs) - 1, 1.0
    i = bisect.bisect_right(logs, x)
    return i, (x - logs[i - 1]) / (logs[i] - logs[i - 1])


def piecewise(logs: Sequence[float], values: Sequence[float], size: float) -> float:
    """values interpolated linearly in log(size) between the knots (logs), flat beyond them."""
    if len(logs) == 1:
        return values[0]
    i, w = hat_weights(logs, size)
    return values[i - 1] + w * (values[i] - values[i - 1])


@lru_cache(maxsize=256)
def _prepared(pts: tuple[tuple[float, float], ...]) -> tuple[list[float], list[float]]:
    """The sizes and their logarithms (a curve is priced thousands of times per estimate)."""
    return [p[0] for p in pts], [math.log(p[0]) for p in pts]


class KernelCost(BaseModel):
    """One aten kernel's own cost (an elementwise, reduction or copy op, by name and dtype), measured by
    replaying its calls from real programs: device seconds = fixed_s + bytes / rate(bytes), bytes read
    + written as the engine counts them; without a `rate` (only small calls were measured) the size
    term is the memory curve's. On a CPU such kernels are no copies: log_softmax computes an exp and a
    log per element, silu an exp, and their throughput has a shape of its own against size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_s: float = Field(ge=0, description="device seconds of one call beyond its bytes (beyond host.op_s)")
    rate: RateCurve | None = Field(default=None, description=(
        "achieved bytes/s against bytes (read + written) beyond the fixed part; default: the memory curve"))
    calls: int = Field(default=0, ge=0, description="distinct calls (shapes) it was measured on")
    bytes_range: tuple[float, float] = Field(default=(0.0, 0.0), description="the smallest and largest of them")


class HostCosts(BaseModel):
    """Seconds the host spends issuing work (Python, the framework's dispatcher, the launch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def op_cost(self, mode: str) -> float:
        """Host seconds of one kernel-running op in a stretch of `mode` (nograd, grad, backward)."""
        if mode == "grad" and self.grad_op_s is not None:
            return self.grad_op_s
        if mode == "backward" and self.backward_op_s is not None:
            return self.backward_op_s
        return self.op_s

    op_s: float = Field(ge=0, description="an aten op that runs a kernel, outside autograd (no_grad): dispatch + launch")
    grad_op_s: float | None = Field(default=None, ge=0, description=(
        "an op in a forward that autograd records (a graph node made); default: op_s"))
    backward_op_s: float | None = Field(default=None, ge=0, description=(
        "an op the autograd engine runs in backward (per op, the engine's node overhead included); default: op_s"))
    view_s: float = Field(ge=0, description="a metadata-only aten op (view, transpose, detach, ...)")
    module_s: float = Field(ge=0, description="one nn.Module call (__call__, hooks, the forward's Python)")
    sync_s: float = Field(default=0.0, ge=0, description="one host-device synchronisation (.item(), a stopping check)")
    optimizer_tensor_s: float = Field(default=0.0, ge=0, description="Python work per parameter tensor in optimizer.step()")
    saved_hook_s: float = Field(default=0.0, ge=0, description=(
        "one call of a saved-tensor hook (gradient checkpointing packs every saved tensor in the forward and "
        "in the recompute, and unpacks it in the backward, through Python hooks)"))
    attention_plan_s: float = Field(default=0.0, ge=0, description=(
        "building the attention kernel's plan for a shape it has not seen (cuDNN's SDPA builds and caches an "
        "execution graph per shape): once per generate() decode step, whose key length is new every step; 0 "
        "where the backend builds none (the CPU, flash and memory-efficient attention)"))
    checkpoint_s: float = Field(default=0.0, ge=0, description=(
        "one torch.utils.checkpoint call (non-reentrant) beyond its ops and hooks: the forward's set-up and the "
        "recompute's (RNG and autocast state, context managers, the frame), per checkpointed layer"))
    layer_s: float = Field(default=0.0, ge=0, description=(
        "a decoder layer's own Python beyond its ops and leaf modules (transformers' attention interface, "
        "kwargs, decorators), per layer forward"))
    model_s: float = Field(default=0.0, ge=0, description=(
        "a model forward's own Python beyond its ops and modules (output capture, mask functions), per forward"))
    generate_step_s: float = Field(default=0.0, ge=0, description=(
        "Python work of one generate() step that dispatches no op (cache bookkeeping, mask and processor "
        "functions, stopping criteria)"))
    generate_call_s: float = Field(default=0.0, ge=0, description=(
        "Python work of one generate() call before its first forward that dispatches no op (generation "
        "config, model kwargs, logits processors and stopping criteria built)"))
    loss_s: float = Field(default=0.0, ge=0, description=(
        "Python work of one loss function call beyond its ops (transformers' loss_function, a technique's loss)"))
    backward_call_s: float = Field(default=0.0, ge=0, description=(
        "one loss.backward() call beyond the ops it runs (the autograd engine's start: graph walk, ready queue)"))
    optimizer_step_s: float = Field(default=0.0, ge=0, description=(
        "one optimizer.step() + zero_grad() call beyond its ops and its per-tensor work (param groups, "
        "hooks, the profiler scopes)"))
    disable_adapter_s: float = Field(default=0.0, ge=0, description=(
        "peft's disable_adapter() context entered and left (a reference scored by the policy with its "
        "adapters off: TRL's DPO, GRPO and PPO), per LoRA layer: the walk over the model's modules and each "
        "LoRA layer's adapters switched off and back on"))


class DeviceProfile(BaseModel):
    """What one device achieves; every figure with its source in `sources`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    device: Literal["cpu", "cuda"]
    host_cpu: str = Field(description="the host CPU the host costs were measured with")
    asynchronous: bool = Field(description="the host runs ahead of the device until a synchronisation (CUDA)")
    matmul: dict[str, RateCurve] = Field(description="achieved FLOP/s of a matmul by dtype, against its FLOPs")
    matmul_layouts: dict[str, dict[str, RateCurve]] = Field(default_factory=dict, description=(
        "achieved FLOP/s of a matmul by dtype and by the layout of its operands (linear: mm(x, w.t()), a Linear "
        "layer's forward; grad_input: mm(grad, w); grad_weight: mm(grad.t(), x)), against its FLOPs (default: the "
        "dtype's `matmul` curve): a CPU's bf16 kernels run 10x apart from one layout to another"))
    matmul_shapes: dict[str, dict[str, MatmulShapes]] = Field(default_factory=dict, description=(
        "achieved FLOP/s of a Linear layer's matmuls by dtype and layout against the layer's shape (M tokens, K in, "
        "N out; MatmulShapes), where measured: it prices every matmul whose op knows its layer's shape (default: "
        "the layout's FLOPs curve); a CPU's bf16 kernels reach rates that depend on K or N, not on FLOPs"))
    attention: dict[str, RateCurve] = Field(default_factory=dict, description=(
        "achieved FLOP/s of SDPA kernels by dtype, against their FLOPs (default: the matmul's)"))
    attention_shapes: dict[str, dict[str, MatmulShapes]] = Field(default_factory=dict, description=(
        "achieved FLOP/s of SDPA kernels by dtype and pass (forward, decode, backward) against their shape, where measured "
        "(MatmulShapes over M = FLOPs / (2 K N) query rows, K the head dim, N the key length): it prices every SDPA "
        "kernel whose op knows its head dim (default: the attention and attention_backward curves); a CPU's kernel "
        "runs 2x apart at equal FLOPs from head dim 16 to 64, and a decode step's (one query row) at a tenth of "
        "a prefill's rate"))
    memory: RateCurve = Field(description="achieved bytes/s of elementwise ops and copies, against bytes moved")
    memory_inplace: RateCurve | None = Field(default=None, description=(
        "achieved bytes/s of in-place ops (add_, mul_, _foreach_*_: no output allocated), against bytes moved "
        "(default: memory's; on the CPU a large new output costs fresh pages, an in-place op does not)"))
    memory_by_dtype: dict[str, RateCurve] = Field(default_factory=dict, description=(
        "achieved bytes/s of elementwise ops and copies whose (first) input is of that dtype (default: memory's): "
        "on a CPU a bf16 kernel converts every element to fp32 and back and moves bytes at about half the rate"))
    memory_inplace_by_dtype: dict[str, RateCurve] = Field(default_factory=dict, description=(
        "the same for in-place ops (default: memory_inplace's)"))
    kernels: dict[str, KernelCost] = Field(default_factory=dict, description=(
        "per aten kernel ('name.dtype', e.g. '_log_softmax.fp32'): its own cost where it was measured (default: "
        "bytes / the memory curve)"))
    attention_backward: dict[str, RateCurve] = Field(default_factory=dict, description=(
        "achieved FLOP/s of SDPA backward kernels by dtype, against their FLOPs (2.5x the forward's; "
        "default: the forward's curve)"))
    foreach_per_tensor: bool = Field(default=False, description=(
        "a _foreach_* op runs one kernel per tensor (the CPU's fallback) rather than one multi-tensor "
        "kernel over the list (CUDA)"))
    launch_s: float = Field(ge=0, description="the least device time of a kernel")
    host: HostCosts
    device_scale: float = Field(default=1.0, gt=0, description=(
        "the fraction of its reference rates a program's kernels reach (the curves already include it): for a "
        "profile derived from public figures, of the measured ceilings; for a calibrated one, of the "
        "micro-benchmarks' rates (a program's operands come from further away than a sweep's)"))
    dtype_scale: dict[str, float] = Field(default_factory=dict, description=(
        "per dtype, a factor on top of device_scale for that dtype's matmul and attention curves (the curves "
        "include it; default 1): on a CPU a program's bf16 kernels and its fp32 ones fall short of their sweeps "
        "by different fractions"))
    fixed_scale: float = Field(default=1.0, gt=0, description=(
        "the factor a program's per-op fixed costs run at over the hot loops that measured them: every op's "
        "host cost (op, grad, backward, view), a module call, each kernel's fixed_s and "
        "matmul_fixed_s (a loop repeats one op with its code and data in the caches; a program runs thousands of "
        "different ones); 1 for a profile built from public figures, fitted by a CPU calibration's step fit"))
    matmul_fixed_s: dict[str, float] = Field(default_factory=dict, description=(
        "per dtype, device seconds every matmul kernel of that dtype takes in a program beyond FLOPs / rate "
        "(default 0): on a CPU a small bf16 matmul costs tens of microseconds whatever its FLOPs"))
    measured_on: str = Field(default="", description="date of the measurement")
    versions: dict[str, str] = Field(default_factory=dict)
    sources: dict[str, str] = Field(default_factory=dict, description="where each figure comes from")
    residuals: dict[str, float] = Field(default_factory=dict, description=(
        "for fitted parameters: relative error of each step the fit used (name -> measured/predicted - 1)"))

    @field_validator("matmul", "attention", "attention_backward")
    @classmethod
    def _dtypes(cls, v: dict[str, RateCurve], info: ValidationInfo) -> dict[str, RateCurve]:
        bad = [k for k in v if k not in DTYPES]
        if bad:
            raise ValueError(f"unknown dtype '{bad[0]}' (allowed: {', '.join(DTYPES)})")
        if not v and info.field_name == "matmul":
            raise ValueError("give a curve for at least one dtype")
        return v

    @field_validator("kernels")
    @classmethod
    def _kernels(cls, v: dict[str, KernelCost]) -> dict[str, KernelCost]:
        for key in v:
            name, _, dt = key.rpartition(".")
            if not name or dt not in DTYPES:
                raise ValueError(f"'{key}': keys are 'aten name.dtype' with dtype one of {', '.join(DTYPES)}")
        return v

    @field_validator("matmul_layouts", "matmul_shapes", "attention_shapes")
    @classmethod
    def _by_dtype(cls, v: dict[str, dict], info: ValidationInfo) -> dict[str, dict]:
        """dtype -> layout (an SDPA kernel's: pass) -> curve or shape model: known dtypes, layouts, passes."""
        what, allowed = (("pass", ATTENTION_PASSES) if info.field_name == "attention_shapes"
                         else ("layout", MATMUL_LAYOUTS))
        for dt, by_key in v.items():
            if dt not in DTYPES:
                raise ValueError(f"unknown dtype '{dt}' (allowed: {', '.join(DTYPES)})")
            bad = [k for k in by_key if k not in allowed]
            if bad:
                raise ValueError(f"{dt}: unknown {what} '{bad[0]}' (allowed: {', '.join(allowed)})")
        return v

    @field_validator("dtype_scale", "matmul_fixed_s")
    @classmethod
    def _per_dtype(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        for k, x in v.items():
            if k not in DTYPES:
                raise ValueError(f"unknown dtype '{k}' (allowed: {', '.join(DTYPES)})")
            positive = info.field_name == "dtype_scale"
            if not (math.isfinite(x) and (x > 0 if positive else x >= 0)):
                raise ValueError(f"{k}: must be {'> 0' if positive else '>= 0'} and finite (got {x})")
        return v

    def matmul_curve(self, dtype: str, layout: str = "") -> RateCurve:
        """The curve for `dtype` and the operands' `layout` (MATMUL_LAYOUTS) where the profile has
        one, else the dtype's, or fp32's (a card without a half-precision figure computes in fp32)."""
        if layout:
            curve = self.matmul_layouts.get(dtype, {}).get(layout)
            if curve is not None:
                return curve
        return self.matmul.get(dtype) or self.matmul.get("fp32") or next(iter(self.matmul.values()))

    def attention_curve(self, dtype: str) -> RateCurve:
        return self.attention.get(dtype) or self.matmul_curve(dtype)

    def with_device_scale(self, scale: float) -> DeviceProfile:
        """The profile with `device_scale` = scale: every rate curve (matmul, its layouts and shapes, attention and its
        shapes, memory,
        the kernels' own) times
        scale / the current device_scale (the curves include the scale)."""
        if not scale > 0:
            raise ValueError("device_scale must be > 0")
        k = scale / self.device_scale
        return self.model_copy(update={
            "matmul": {d: c.scaled(k) for d, c in self.matmul.items()},
            "matmul_layouts": {d: {lay: c.scaled(k) for lay, c in cs.items()} for d, cs in self.matmul_layouts.items()},
            "matmul_shapes": {d: {lay: c.scaled(k) for lay, c in cs.items()} for d, cs in self.matmul_shapes.items()},
            "attention": {d: c.scaled(k) for d, c in self.attention.items()},
            "attention_backward": {d: c.scaled(k) for d, c in self.attention_backward.items()},
            "attention_shapes": {d: {ps: c.scaled(k) for ps, c in cs.items()} for d, cs in self.attention_shapes.items()},
            "memory": self.memory.scaled(k),
            "memory_inplace": self.memory_inplace.scaled(k) if self.memory_inplace is not None else None,
            "memory_by_dtype": {d: c.scaled(k) for d, c in self.memory_by_dtype.items()},
            "memory_inplace_by_dtype": {d: c.scaled(k) for d, c in self.memory_inplace_by_dtype.items()},
            "kernels": {n: (kc.model_copy(update={"rate": kc.rate.scaled(k)}) if kc.rate is not None else kc)
                        for n, kc in self.kernels.items()},
            "device_scale": scale,
        })

    def with_dtype_scale(self, dtype: str, scale: float) -> DeviceProfile:
        """The profile with dtype_scale[dtype] = scale: that dtype's matmul (every layout and shape model), attention
        and attention backward curves (and shape models) times scale / the current factor (the curves include it)."""
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}' (allowed: {', '.join(DTYPES)})")
        if not scale > 0:
            raise ValueError("dtype_scale must be > 0")
        k = scale / self.dtype_scale.get(dtype, 1.0)

        def rescaled(curves: dict[str, RateCurve]) -> dict[str, RateCurve]:
            return {d: (c.scaled(k) if d == dtype else c) for d, c in curves.items()}

        return self.model_copy(update={
            "matmul": rescaled(self.matmul), "attention": rescaled(self.attention),
            "matmul_layouts": {d: ({lay: c.scaled(k) for lay, c in cs.items()} if d == dtype else cs)
                               for d, cs in self.matmul_layouts.items()},
            "matmul_shapes": {d: ({lay: c.scaled(k) for lay, c in cs.items()} if d == dtype else cs)
                              for d, cs in self.matmul_shapes.items()},
            "attention_backward": rescaled(self.attention_backward),
            "attention_shapes": {d: ({ps: c.scaled(k) for ps, c in cs.items()} if d == dtype else cs)
                                 for d, cs in self.attention_shapes.items()},
            "dtype_scale": {**self.dtype_scale, dtype: scale},
        })

    def attention_backward_curve(self, dtype: str) -> RateCurve:
        return self.attention_backward.get(dtype) or self.attention_curve(dtype)

    def memory_curve(self, inplace: bool, dtype: str | None = None) -> RateCurve:
        """The curve of a memory-bound op, in place or into a new tensor, of `dtype` (its own curve if
        the profile has one, else the one over all dtypes)."""
        if inplace:
            return self.memory_inplace_by_dtype.get(dtype or "") or self.memory_inplace or self.memory
        return self.memory_by_dtype.get(dtype or "") or self.memory


def _catalog_dir():
    return resources.files("planner").joinpath("data", "profiles")


def profile_ids() -> list[str]:
    d = _catalog_dir()
    return sorted(p.name.removesuffix(".json") for p in d.iterdir() if p.name.endswith(".json")) if d.is_dir() else []


def parse_profile(data: object, where: str) -> DeviceProfile:
    """A DeviceProfile from parsed JSON, with one-line errors naming the field and the file."""
    if not isinstance(data, dict):
        raise ProfileError(f"profile: {where} must hold a JSON object")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "required field missing"
        elif err.get("type") == "extra_forbidden":
            msg = f"unknown field{did_you_mean(loc.rsplit('.', 1)[-1], DeviceProfile.model_fields)}"
        raise ProfileError(f"profile: {where}: {loc or 'profile'}: {msg}") from None


@lru_cache(maxsize=32)
def _catalog_profile(pid: str) -> DeviceProfile:
    entry = _catalog_dir().joinpath(f"{pid}.json")
    return parse_profile(json.loads(entry.read_text(encoding="utf-8")), f"catalog profile {pid}")


def load_profile(ref: str | Path) -> DeviceProfile:
    """A catalog profile id (planner/data/profiles/ID.json) or a profile file written by
    `planner calibrate -o FILE`. ProfileError (one line) otherwise."""
    ref = str(ref)
    if ref in profile_ids():
        return _catalog_profile(ref)
    path = Path(ref).expanduser()
    if not path.is_file():
        if path.suffix == ".json" or "/" in ref:
            raise ProfileError(f"profile: no such file '{ref}'")
        raise ProfileError(f"profile: unknown profile '{ref}'{did_you_mean(ref, profile_ids()) or ''} "
                           f"(catalog: {', '.join(profile_ids()) or 'none'}; or give a file from planner calibrate -o)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"profile: cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile: {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return parse_profile(data, str(path))
