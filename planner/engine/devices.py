"""The device profile a plan's time is priced with: a catalog profile (planner/data/profiles/), a
file from `planner calibrate`, or one derived from the GPU catalog's public figures.

Derived profiles (every card without a measured profile), with their sources:
- matmul rates by dtype: the card's dense half-precision peak (datasheet) times the achievable
  ceiling of a large matmul (planner.engine.compute.efficiency: the H200's measured 788.8/989, the
  "Maximum Achievable Matmul FLOPS" table for A100/H100/MI300X), shaped by op size as Calculon's
  H100 system file does (calculon-ai/calculon systems/h100_80g_nvl8.json, as summarised in
  shared/notes/timing.md: efficiency 0.1 at 0 GFLOP, 0.6 at 1, 0.9 at 16, 0.95 at >= 128 GFLOP;
  normalised so that the largest size reaches the measured ceiling); fp32 (no TF32: torch's
  default `allow_tf32 = False` for matmuls) at 1/16 of the half-precision peak
  (planner.engine.compute.FP32_PEAK_FRACTION), the same shape;
- SDPA attention: FLASH_FRACTION of the matmul rate (FlashAttention-2 reaches 50-73% of the A100's
  peak in its forward and less in its backward, Dao 2023, arXiv:2307.08691 fig. 4-6: 0.6 taken);
- memory: the datasheet bandwidth times the measured copy ceiling (H200: 4258.8/4800), shaped by
  Calculon's HBM efficiency (0.3 at 0 MB, 0.6 at 1 MB, 0.75 at 10 MB, 0.9 at >= 100 MB, normalised
  to the ceiling at the largest size);
- launch latency and host costs: those of the shipped H200 profile (fitted on the 16 measured H200
  steps; the only CUDA host measured here): a different host CPU changes them (TaxBreak, arXiv
  2603.12465: 10-29%), which `planner calibrate --device cuda` on the user's machine measures.
"""

from __future__ import annotations

from functools import lru_cache

from planner.engine import compute
from planner.gpus import GPUSpec
from planner.profiles import DeviceProfile, HostCosts, ProfileError, RateCurve, load_profile, profile_ids

# (GFLOP, efficiency) and (MB, efficiency): Calculon's H100 tables (module doc)
MATMUL_SHAPE = ((0.001, 0.1), (1.0, 0.6), (16.0, 0.9), (128.0, 0.95))
MEMORY_SHAPE = ((0.001, 0.3), (1.0, 0.6), (10.0, 0.75), (100.0, 0.9))
FLASH_FRACTION = 0.6
SHIPPED_HOST = "h200"  # the catalog profile whose host costs derived profiles take


def _curve(shape: tuple[tuple[float, float], ...], unit: float, ceiling: float) -> RateCurve:
    """Rates at the shape's sizes (size x unit), scaled so that the last point reaches `ceiling`."""
    top = shape[-1][1]
    return RateCurve(points=tuple((size * unit, ceiling * eff / top) for size, eff in shape))


def derived_profile(gpu: GPUSpec, host: HostCosts, launch_s: float, host_note: str,
                    device_scale: float = 1.0) -> DeviceProfile:
    """A CUDA profile from the GPU catalog's figures (module doc). `device_scale`: the fraction of
    the micro-benchmark ceilings an eager program's kernels reach (fitted for the shipped H200
    profile on its measured steps; 1 means the ceilings)."""
    eff = compute.efficiency(gpu)
    matmul: dict[str, RateCurve] = {}
    attention: dict[str, RateCurve] = {}
    sources: dict[str, str] = {}
    for dtype in ("bf16", "fp16", "fp32"):
        try:
            peak = compute.peak_flops(gpu, dtype)
        except ValueError:
            continue
        ceiling = peak * eff.matmul * device_scale
        matmul[dtype] = _curve(MATMUL_SHAPE, 1e9, ceiling)
        attention[dtype] = _curve(MATMUL_SHAPE, 1e9, ceiling * FLASH_FRACTION)
    if not matmul:
        raise ProfileError(f"profile: {gpu.id} has no FLOP/s figures in the catalog; give --profile FILE "
                           "(planner calibrate --device cuda measures one)")
    bandwidth = (gpu.mem_bandwidth_gb_per_s or 1000.0) * 1e9 * eff.memory * device_scale
    sources.update({
        "matmul": f"datasheet peak x {eff.matmul:.3f} ({eff.source}), shaped by Calculon's H100 efficiency table",
        "attention": f"{FLASH_FRACTION} x the matmul rate (FlashAttention-2's fraction of peak)",
        "memory": f"datasheet {gpu.mem_bandwidth_gb_per_s} GB/s x {eff.memory:.3f}, shaped by Calculon's HBM table",
        "host": host_note,
    })
    return DeviceProfile(id=f"derived-{gpu.id}", name=f"{gpu.name} (derived from the catalog)", device="cuda",
                         host_cpu="the H200 measurement's host", asynchronous=True, matmul=matmul,
                         attention=attention, memory=_curve(MEMORY_SHAPE, 1e6, bandwidth), launch_s=launch_s,
                         host=host, sources=sources)


@lru_cache(maxsize=64)
def _default(gpu: GPUSpec) -> DeviceProfile:
    base = gpu.id.split("@")[0]
    if base in profile_ids():
        return load_profile(base)
    shipped = load_profile(SHIPPED_HOST)
    return derived_profile(gpu, shipped.host, shipped.launch_s,
                           f"the shipped {shipped.name} profile's host costs (fitted on its measured steps)",
                           device_scale=shipped.device_scale)


def profile_for(gpu: GPUSpec, profile: str | None = None) -> DeviceProfile:
    """The profile a plan on `gpu` is priced with: `profile` (a catalog id or a file) if given, the
    card's catalog profile, or one derived from its catalog figures."""
    if profile is not None:
        return load_profile(profile)
    return _default(gpu)
