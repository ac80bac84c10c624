"""Time of one engine iteration (one forward over a batch), from a roofline.

An iteration runs `tokens` query tokens (prefill chunks plus one per decoding sequence) and
computes `rows` logit rows (one per decoding sequence and per prompt whose prefill ends). On one
rank::

    compute = (2 x P_lin x tokens + 2 x hidden x vocab x rows + 4 x heads x head_dim x keys) / (peak x e_c)
    memory  = (weights + KV bytes read) / (bandwidth x e_m)
    time    = max(compute, memory) + all-reduces + overhead

P_lin is the decoder linears' parameters per rank (the issue's 2·params·tokens, without the
embedding, which is a lookup, and with the lm_head counted per logit row only); MoE layers count
`experts_per_token` experts per token for FLOPs and the expected number of distinct experts
touched, E x (1 - (1 - k/E)^tokens), for the weight bytes. `keys` sums, over query tokens and
layers, the keys each query attends to (causal: a prefill chunk of c tokens after d cached ones
has c x d + c(c+1)/2; a decode step one per cached token; sliding layers at most the window).
Prefill is compute-bound and decode bandwidth-bound by the same formula; mixed (chunked) batches
take the larger of the two.

Efficiency factors (what fraction of the datasheet peak a real kernel reaches):
- H200: measured, 788.8 TFLOP/s for an 8192^3 bf16 matmul = 0.797 of 989, and 4258.8 GB/s for a
  device-to-device copy = 0.887 of 4800 (shared/reference/measured_ceilings.csv, GPUSpec.measured).
- Other cards: no measurement yet, so the same two fractions (stated in the report).
- Overhead per iteration: 1 ms (scheduler, sampler, input preparation, kernel launch gaps). An
  assumption to calibrate: vLLM's decode on an H100 runs ~1 ms slower than the weight read.
- Tensor parallelism: 2 all-reduces per layer of tokens x hidden activations, ring cost
  2 (tp-1)/tp x bytes over one direction of the link at 0.7 efficiency, plus 10 us each
  (assumptions).
- fp8 weights on sm89+ and int8 on sm75+ run W8A8 matmuls at twice the 16-bit peak; nf4 is
  dequantized to 16-bit matmuls.
All of them can be replaced by `Calibration` (a file or flags).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from planner.serving.capacity import DTYPE_BYTES, Setup, weight_bytes
from planner.serving.specs import Calibration, ServeInputError, build

H200_COMPUTE_EFFICIENCY = 788.8 / 989.0  # measured_ceilings.csv: bf16 matmul / datasheet peak
H200_MEMORY_EFFICIENCY = 4258.8 / 4800.0  # measured_ceilings.csv: copy GB/s / datasheet bandwidth
DEFAULT_ITERATION_OVERHEAD_S = 1.0e-3
DEFAULT_COMM_EFFICIENCY = 0.7
DEFAULT_COMM_LATENCY_S = 10e-6


def load_calibration(path: str | Path, overrides: dict[str, Any] | None = None) -> Calibration:
    """A Calibration from a JSON or YAML file (keys: Calibration's fields), flags overriding it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServeInputError(f"calibration: cannot read {path}: {e}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ServeInputError(f"calibration {path}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'} "
                              f"({' '.join(str(e).split())})") from None  # fmt: skip
    if not isinstance(data, dict):
        raise ServeInputError(f"calibration {path}: expected a mapping of names to numbers")
    data.setdefault("source", str(path))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(Calibration, data, prefix=f"calibration {path}: ")


class Roofline:
    """Iteration-time coefficients for one Setup (plain attributes: the simulator reads them in its loop)."""

    def __init__(self, setup: Setup, calibration: Calibration | None = None) -> None:
        cal = calibration or Calibration()
        m, gpu, tp = setup.model, setup.gpu, setup.tp
        notes: list[str] = []
        peak = cal.peak_tflops
        if peak is None:
            peak = gpu.fp16_tflops if setup.serving_dtype == "fp16" and gpu.fp16_tflops else gpu.bf16_tflops
            peak = peak or gpu.fp16_tflops
        bw = cal.bandwidth_gb_per_s or gpu.mem_bandwidth_gb_per_s
        if peak is None or bw is None:
            raise ServeInputError(
                f"gpu: {gpu.name} has no compute or bandwidth figures to time the simulation; give --peak-tflops and "
                "--bandwidth-gbps (or --capacity-only)"
            )
        cc = float(gpu.compute_capability) if gpu.compute_capability else 0.0
        if cal.peak_tflops is None and (
            (setup.weights_dtype == "fp8" and cc >= 8.9) or (setup.weights_dtype == "int8" and cc >= 7.5)
        ):
            peak *= 2
            notes.append(f"{setup.weights_dtype} W8A8 matmuls at twice the 16-bit peak")
        if gpu.measured is not None and gpu.bf16_tflops and gpu.mem_bandwidth_gb_per_s:
            d_ec = gpu.measured.bf16_matmul_tflops / gpu.bf16_tflops
            d_em = gpu.measured.copy_gb_per_s / gpu.mem_bandwidth_gb_per_s
            eff_src = f"measured on this card ({gpu.measured.date})"
        else:
            d_ec, d_em = H200_COMPUTE_EFFICIENCY, H200_MEMORY_EFFICIENCY
            eff_src = "the H200's measured fractions (no measurement of this card)"
        self.compute_efficiency = cal.compute_efficiency or d_ec
        self.memory_efficiency = cal.memory_efficiency or d_em
        self.iteration_overhead_s = (
            DEFAULT_ITERATION_OVERHEAD_S if cal.iteration_overhead_s is None else cal.iteration_overhead_s
        )
        self.peak_tflops = peak
        self.bandwidth_gb_per_s = bw
        self.flops_rate = peak * 1e12 * self.compute_efficiency
        self.byte_rate = bw * 1e9 * self.memory_efficiency
        self.efficiency_source = (
            cal.source or "calibration" if cal.compute_efficiency or cal.memory_efficiency else eff_src
        )

        layers = m.num_layers
        lin = sum(x.in_features * x.out_features * x.count for x in m.layer_linears)
        experts_active = 0.0
        if m.num_experts:
            experts_active = m.layer_expert_params * m.experts_per_token / m.num_experts
        self.flops_token = 2.0 * layers * (lin + experts_active + m.layer_router_params) / tp
        self.flops_row = 2.0 * m.hidden_size * m.vocab_size / tp
        self.flops_key = 4.0 * setup.heads_per_rank * m.head_dim  # QK^T and PV, per layer
        self.full_layers = setup.full_layers
        self.sliding_layers = setup.sliding_layers
        self.window = setup.window
        w = weight_bytes(setup)
        expert_bytes = 0.0
        if m.num_experts:
            expert_bytes = layers * m.layer_expert_params / tp * DTYPE_BYTES[setup.weights_dtype]
        self.expert_bytes = expert_bytes
        self.num_experts = m.num_experts
        self.expert_frac = m.experts_per_token / m.num_experts if m.num_experts else 0.0
        self.weight_bytes = w.total - w.rotary_cache - expert_bytes
        self.kv_bytes = float(setup.kv_layer_token_bytes_per_rank)
        self.tp = tp
        act = DTYPE_BYTES[setup.serving_dtype]
        if tp > 1:
            link = gpu.interconnect_gb_per_s_per_direction or 32.0
            ce = cal.comm_efficiency or DEFAULT_COMM_EFFICIENCY
            lat = DEFAULT_COMM_LATENCY_S if cal.comm_latency_s is None else cal.comm_latency_s
            n_ar = 2 * layers
            self.comm_fixed = n_ar * lat
            self.comm_per_token = n_ar * 2 * (tp - 1) / tp * m.hidden_size * act / (link * 1e9 * ce)
            notes.append(f"{n_ar} all-reduces per iteration over {link:g} GB/s per direction at {ce:g}")
        else:
            self.comm_fixed = 0.0
            self.comm_per_token = 0.0
        self.fixed = self.iteration_overhead_s + self.comm_fixed
        self.notes = notes

    # ---- one iteration ---------------------------------------------------------------------
    def weights_read(self, tokens: float) -> float:
        if not self.num_experts:
            return self.weight_bytes
        touched = 1.0 - (1.0 - self.expert_frac) ** tokens
        return self.weight_bytes + self.expert_bytes * touched

    def step_time(self, tokens: float, rows: float, keys: float, kv_read: float) -> float:
        """Seconds for one iteration. `keys` and `kv_read` are already weighted by layers (full x F + sliding x Wl)."""
        compute = (self.flops_token * tokens + self.flops_row * rows + self.flops_key * keys) / self.flops_rate
        memory = (self.weights_read(tokens) + self.kv_bytes * kv_read) / self.byte_rate
        return (compute if compute > memory else memory) + self.fixed + self.comm_per_token * tokens

    def decode_lines(self, n: int, keys0: float, keys_slope: float) -> tuple[float, float, float, float, float]:
        """Per-step time of a decode-only stretch as max(a1 + b1 j, a2 + b2 j) + c (j = steps from now).

        `keys0` is the layer-weighted context the n sequences attend to now, `keys_slope` its growth per step.
        """
        a1 = (self.flops_token * n + self.flops_row * n + self.flops_key * keys0) / self.flops_rate
        b1 = self.flops_key * keys_slope / self.flops_rate
        a2 = (self.weights_read(n) + self.kv_bytes * keys0) / self.byte_rate
        b2 = self.kv_bytes * keys_slope / self.byte_rate
        return a1, b1, a2, b2, self.fixed + self.comm_per_token * n

    def describe(self) -> dict[str, Any]:
        return {
            "peak_tflops": self.peak_tflops,
            "bandwidth_gb_per_s": self.bandwidth_gb_per_s,
            "compute_efficiency": round(self.compute_efficiency, 4),
            "memory_efficiency": round(self.memory_efficiency, 4),
            "iteration_overhead_s": self.iteration_overhead_s,
            "efficiency_source": self.efficiency_source,
            "notes": list(self.notes),
        }


def _arith(a: float, b: float, lo: int, hi: int) -> float:
    """sum_{j=lo}^{hi-1} (a + b j)."""
    n = hi - lo
    if n <= 0:
        return 0.0
    return n * a + b * (lo + hi - 1) * n / 2.0


def sum_max_lines(a1: float, b1: float, a2: float, b2: float, m: int) -> float:
    """sum_{j=0}^{m-1} max(a1 + b1 j, a2 + b2 j), in O(1): the two lines cross at most once."""
    if m <= 0:
        return 0.0
    d0, dd = a1 - a2, b1 - b2
    if dd == 0.0:
        return _arith(a1, b1, 0, m) if d0 >= 0 else _arith(a2, b2, 0, m)
    x = -d0 / dd  # line 1 >= line 2 for j >= x (dd > 0) or j <= x (dd < 0)
    if dd > 0:
        j0 = min(m, max(0, int(-(-x // 1))))  # ceil(x), clamped
        return _arith(a2, b2, 0, j0) + _arith(a1, b1, j0, m)
    j0 = min(m, max(0, int(x // 1) + 1))  # floor(x) + 1
    return _arith(a1, b1, 0, j0) + _arith(a2, b2, j0, m)


def steps_to_reach(a1: float, b1: float, a2: float, b2: float, c: float, k: int, dt: float) -> int:
    """Smallest m in [1, k] with sum_max_lines(a1, b1, a2, b2, m) + c m >= dt (k if none).

    One line dominates the whole stretch in the common case: then the sum is quadratic in m and
    solved directly (checked on both sides against rounding); otherwise bisection.
    """

    def total(m: int) -> float:
        return sum_max_lines(a1, b1, a2, b2, m) + c * m

    if k <= 1 or total(k) < dt:
        return k
    d_first, d_last = a1 - a2, (a1 + b1 * (k - 1)) - (a2 + b2 * (k - 1))
    if (d_first >= 0) == (d_last >= 0):
        a, b = (a1, b1) if d_first >= 0 else (a2, b2)
        lin = a + c - b / 2.0
        if b > 0:
            m = math.ceil((-lin + math.sqrt(max(lin * lin + 2.0 * b * dt, 0.0))) / b)
        else:
            m = math.ceil(dt / (a + c)) if a + c > 0 else k
        m = min(max(m, 1), k)
        while m > 1 and total(m - 1) >= dt:
            m -= 1
        while m < k and total(m) < dt:
            m += 1
        return m
    lo, hi = 1, k
    while lo < hi:
        mid = (lo + hi) // 2
        if total(mid) >= dt:
            hi = mid
        else:
            lo = mid + 1
    return lo
