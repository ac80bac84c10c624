"""What `planner serve` is asked: the serving setup, the traffic, and the calibration of the time model.

Three pydantic models, validated once at the edge (CLI, YAML, Python callers):

- `ServeSpec`: model, card, tensor parallelism, dtypes and vLLM's engine limits. Every default is
  vLLM's (`vllm serve`): `kv_dtype="auto"` (the model's dtype), `block_size=16`,
  `gpu_memory_utilization=0.9`, `max_model_len` = the model's context, and `max_num_seqs` /
  `max_num_batched_tokens` chosen by card as `EngineArgs.get_batch_defaults` does (see
  `capacity.engine_limits`).
- `TrafficSpec`: a request stream, Poisson arrivals with length distributions, or a trace CSV.
- `Calibration`: the efficiency factors and overheads of the roofline time model (`roofline.py`).

Errors are `ServeInputError` (a ValueError) with a one-line message; the CLI turns them into exit 2.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

WeightsDtype = Literal["bf16", "fp16", "fp32", "fp8", "int8", "nf4"]
KVDtype = Literal["auto", "bf16", "fp16", "fp32", "fp8"]
LengthDist = Literal["fixed", "uniform", "normal", "lognormal"]

WEIGHTS_DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32", "fp8", "int8", "nf4")
KV_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32", "fp8")
LENGTH_DISTS: tuple[str, ...] = ("fixed", "uniform", "normal", "lognormal")
# vLLM's CacheConfig.block_size choices
BLOCK_SIZES: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256)


class ServeInputError(ValueError):
    """Bad serving input; the message is one line naming the thing at fault."""


class ServeSpec(BaseModel):
    """One serving engine (vLLM-like) on `tp` identical cards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="catalog id, config.json or model directory")
    gpu: str | None = Field(default=None, description="catalog card id")
    gpu_memory: int | str | None = Field(default=None, description="custom card memory (bytes or '80GiB')")
    tp: int = Field(default=1, ge=1, description="tensor-parallel degree (cards per replica)")
    weights_dtype: WeightsDtype | None = Field(default=None, description="None: the serving dtype")
    kv_dtype: KVDtype = Field(default="auto", description="auto: the serving dtype (vLLM's kv_cache_dtype=auto)")
    block_size: int = Field(default=16, description="tokens per KV block (vLLM default 16)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, gt=0, description="None: the model's context length")
    max_num_seqs: int | None = Field(default=None, gt=0, description="None: vLLM's default for the card")
    max_num_batched_tokens: int | None = Field(default=None, gt=0, description="None: vLLM's default for the card")

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v not in BLOCK_SIZES:
            raise ValueError(f"must be one of {', '.join(map(str, BLOCK_SIZES))} (vLLM's choices)")
        return v


class TrafficSpec(BaseModel):
    """A request stream: Poisson arrivals and length distributions, or a trace file.

    Lengths are drawn with the given mean and coefficient of variation (std / mean); `fixed`
    ignores the cv. `rate=inf` puts every request at t=0 (an offline batch).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(default=4.0, description="requests per second (Poisson); inf: all at t=0")
    requests: int = Field(default=1000, gt=0)
    prompt_len: int = Field(default=1024, gt=0)
    new_tokens: int = Field(default=256, gt=0)
    prompt_dist: LengthDist = "fixed"
    output_dist: LengthDist = "fixed"
    prompt_cv: float = Field(default=0.5, ge=0.0)
    output_cv: float = Field(default=0.5, ge=0.0)
    seed: int = 0
    trace: str | None = Field(default=None, description="CSV with columns arrival, prompt_tokens, output_tokens")

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: float) -> float:
        if math.isnan(v) or v <= 0:
            raise ValueError(f"must be > 0 requests per second (got {v:g}); use inf for all requests at t=0")
        return v


class Calibration(BaseModel):
    """Knobs of the roofline time model; None means the documented default (`roofline.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute_efficiency: float | None = Field(default=None, gt=0.0, le=1.0, description="achieved / peak matmul FLOP/s")
    memory_efficiency: float | None = Field(default=None, gt=0.0, le=1.0, description="achieved / peak HBM bandwidth")
    iteration_overhead_s: float | None = Field(default=None, ge=0.0, description="fixed time per engine step")
    comm_efficiency: float | None = Field(default=None, gt=0.0, le=1.0, description="achieved / peak link bandwidth")
    comm_latency_s: float | None = Field(default=None, ge=0.0, description="fixed time per all-reduce")
    peak_tflops: float | None = Field(default=None, gt=0.0, description="override the card's dense bf16 peak")
    bandwidth_gb_per_s: float | None = Field(default=None, gt=0.0, description="override the card's memory bandwidth")
    source: str = Field(default="", description="where these numbers come from (free text)")


def one_line(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic ValidationError as one line: 'field: message (got value)'; several joined by '; '."""
    parts: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "input"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        got = err.get("input")
        text = f"{prefix}{loc.replace('_', '-')}: {msg}"
        if err.get("type") == "extra_forbidden":
            text = f"{prefix}unknown key '{loc}'"
        elif not isinstance(got, (dict, list)) and "(got" not in msg:
            text += f" (got {got!r})"
        if text not in parts:
            parts.append(text)
    return "; ".join(parts)


def build(model_cls: type[BaseModel], values: dict[str, Any], prefix: str = "") -> Any:
    """model_cls(**values) with a ServeInputError (one line) instead of a ValidationError."""
    try:
        return model_cls(**values)
    except ValidationError as e:
        raise ServeInputError(one_line(e, prefix)) from None
