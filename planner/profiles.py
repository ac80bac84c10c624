"""Device profiles: what one device achieves, measured on it or built from public figures, with sources.

The time model (planner.engine.cost) prices every op of the replayed program with a profile:
- device time of an op = launch_s + max(FLOPs / rate(FLOPs), bytes / memory rate(bytes)) for
  matmuls and attention (rates by dtype: `matmul`, by dtype and operand layout where measured
  `matmul_layouts`, `attention` for SDPA forward, `attention_backward` for its backward),
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
    attention: dict[str, RateCurve] = Field(default_factory=dict, description=(
        "achieved FLOP/s of SDPA kernels by dtype, against their FLOPs (default: the matmul's)"))
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

    @field_validator("matmul_layouts")
    @classmethod
    def _layouts(cls, v: dict[str, dict[str, RateCurve]]) -> dict[str, dict[str, RateCurve]]:
        for dt, curves in v.items():
            if dt not in DTYPES:
                raise ValueError(f"unknown dtype '{dt}' (allowed: {', '.join(DTYPES)})")
            bad = [k for k in curves if k not in MATMUL_LAYOUTS]
            if bad:
                raise ValueError(f"{dt}: unknown layout '{bad[0]}' (allowed: {', '.join(MATMUL_LAYOUTS)})")
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
        """The profile with `device_scale` = scale: every rate curve (matmul and its layouts, attention, memory,
        the kernels' own) times
        scale / the current device_scale (the curves include the scale)."""
        if not scale > 0:
            raise ValueError("device_scale must be > 0")
        k = scale / self.device_scale
        return self.model_copy(update={
            "matmul": {d: c.scaled(k) for d, c in self.matmul.items()},
            "matmul_layouts": {d: {lay: c.scaled(k) for lay, c in cs.items()} for d, cs in self.matmul_layouts.items()},
            "attention": {d: c.scaled(k) for d, c in self.attention.items()},
            "attention_backward": {d: c.scaled(k) for d, c in self.attention_backward.items()},
            "memory": self.memory.scaled(k),
            "memory_inplace": self.memory_inplace.scaled(k) if self.memory_inplace is not None else None,
            "memory_by_dtype": {d: c.scaled(k) for d, c in self.memory_by_dtype.items()},
            "memory_inplace_by_dtype": {d: c.scaled(k) for d, c in self.memory_inplace_by_dtype.items()},
            "kernels": {n: (kc.model_copy(update={"rate": kc.rate.scaled(k)}) if kc.rate is not None else kc)
                        for n, kc in self.kernels.items()},
            "device_scale": scale,
        })

    def with_dtype_scale(self, dtype: str, scale: float) -> DeviceProfile:
        """The profile with dtype_scale[dtype] = scale: that dtype's matmul (every layout), attention
        and attention backward curves times scale / the current factor (the curves include it)."""
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
            "attention_backward": rescaled(self.attention_backward),
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
