"""The planner as a library: `fit(plan)` answers "does this plan fit this card, and if not, what would?".

    from planner.api import fit
    from planner.specs import Plan
    result = fit(Plan(model="llama-3.1-8b", gpu="a100-80gb", method="qlora", batch=4, grad_ckpt=True))
    result.fits, result.headroom_bytes, result.memory.device_bytes, result.suggestions

The verdict is `device_bytes <= gpu.memory_bytes`: the estimate's device figure (peak allocated,
plus the caching allocator, plus CUDA context and workspaces) against what the CUDA runtime reports
as the card's total. Everything here runs the pure-Python estimator only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from planner.gpus import GPUSpec, resolve_gpu
from planner.result import MemoryEstimate
from planner.specs import Plan
from planner.suggest import Suggestion, suggest

__all__ = ["DistributedFitResult", "FitResult", "fit", "fit_distributed", "plan_warnings"]


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    num_params: int | None = None
    max_position_embeddings: int | None = None


class FitResult(BaseModel):
    """The answer for one plan on one card. Sizes in bytes."""

    fits: bool
    gpu: GPUSpec
    model: ModelInfo
    memory: MemoryEstimate
    headroom_bytes: int = Field(description="gpu.memory_bytes - memory.device_bytes (negative: short by that much)")
    suggestions: list[Suggestion] = Field(default_factory=list)
    plan: Plan
    warnings: list[str] = Field(default_factory=list)
    phase_seconds: dict[str, float] = Field(default_factory=dict, description="roofline time of each phase of one step")
    resident: dict[str, list[str]] = Field(default_factory=dict, description="models resident in each phase (roles)")
    tokens_per_step: int = 0

    def to_json(self) -> dict[str, Any]:
        """The CLI's --json document (stable keys)."""
        m = self.memory
        return {
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "gpu": {"id": self.gpu.id, "name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes},
            "model": self.model.model_dump(),
            "memory": {
                "peak_allocated_bytes": m.peak_allocated_bytes,
                "reserved_bytes": m.reserved_bytes,
                "device_bytes": m.device_bytes,
                "peak_phase": m.peak_phase,
                "breakdown": dict(m.breakdown),
                "details": dict(m.details),
                "device_items": dict(m.device_items),
                "outside_allocator": dict(m.outside_allocator),
                "phases": dict(m.phases),
            },
            "suggestions": [s.to_json() for s in self.suggestions],
            "plan": self.plan.model_dump(mode="json"),
            "warnings": list(self.warnings),
            "time": self.time_json(),
            "resident": dict(self.resident),
        }

    def time_json(self) -> dict[str, Any]:
        step = sum(self.phase_seconds.values())
        return {"phases_s": dict(self.phase_seconds), "step_s": step,
                "tokens_per_s": self.tokens_per_step / step if step else None}


def _model_info(model: Any) -> ModelInfo:
    mid = str(getattr(model, "id", None) or getattr(model, "name", "model"))
    return ModelInfo(
        id=mid,
        name=str(getattr(model, "name", None) or mid),
        num_params=getattr(model, "num_params", None),
        max_position_embeddings=getattr(model, "max_position_embeddings", None),
    )


def plan_warnings(plan: Plan, model: Any, gpu: GPUSpec) -> list[str]:
    """Things the user should know that do not stop the estimate."""
    out: list[str] = []
    ctx = getattr(model, "max_position_embeddings", None)
    mid = getattr(model, "id", None) or plan.model
    if ctx:
        if plan.task == "sft" and plan.seq > ctx:
            out.append(
                f"seq: {plan.seq} tokens is beyond {mid}'s context of {ctx} tokens (max_position_embeddings); "
                "estimated as asked, but the model was not trained for it"
            )
        if plan.task == "generate" and plan.prompt_len + plan.new_tokens > ctx:
            out.append(
                f"prompt_len + new_tokens = {plan.prompt_len + plan.new_tokens} tokens is beyond {mid}'s context of "
                f"{ctx} tokens (max_position_embeddings); estimated as asked"
            )
    if plan.compute_dtype == "bf16" and gpu.bf16_tflops is None and not gpu.custom:
        out.append(f"precision: {gpu.name} has no bf16 support; use fp16 or mixed-fp16 there")
    return out


def fit(plan: Plan, with_suggestions: bool = True) -> FitResult:
    """Load the model and card the plan names, estimate, and judge. Raises ModelError/GPUError (ValueError)."""
    from planner.models import load_model

    gpu = resolve_gpu(plan.gpu, plan.gpu_memory)
    model = load_model(plan.model)
    from planner.engine import estimate  # after the inputs are known good: bad input is reported first

    est = estimate(plan, model, gpu)
    fits = est.device_bytes <= gpu.memory_bytes
    suggestions: list[Suggestion] = []
    if not fits and with_suggestions:
        suggestions = suggest(
            plan, model, gpu.memory_bytes, estimate=lambda p, m: estimate(p, m, gpu), bf16_supported=gpu.custom or gpu.bf16_tflops is not None
        )
    from planner.engine.timing import phase_times, tokens_per_step
    from planner.plugins import technique

    workload = technique(plan.task).workload(plan, model)
    times = phase_times(workload, gpu) if (gpu.bf16_tflops or gpu.fp16_tflops) else {}
    return FitResult(
        fits=fits,
        gpu=gpu,
        model=_model_info(model),
        memory=est,
        headroom_bytes=gpu.memory_bytes - est.device_bytes,
        suggestions=suggestions,
        plan=plan,
        warnings=plan_warnings(plan, model, gpu),
        phase_seconds=times,
        resident={ph.name: [m.role for m in workload.models] for ph in workload.phases},
        tokens_per_step=tokens_per_step(workload),
    )


class DistributedFitResult(BaseModel):
    """A plan on many GPUs: per-rank memory of the busiest rank (and its peak in every phase of the
    technique's step), collectives, step time."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    plan: Plan
    gpu: GPUSpec
    estimate: Any
    warnings: list[str] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "fits": e.fits,
            "gpu": {"id": self.gpu.id, "name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes},
            "layout": e.layout.model_dump(mode="json") | {"dp": e.layout.dp, "grad_accum": e.layout.grad_accum},
            "memory": e.memory.model_dump(mode="json"),
            "stages": [s.model_dump(mode="json") for s in e.stages],
            "cpu_bytes_per_node": e.cpu_bytes_per_node,
            "collectives": [c.model_dump(mode="json") for c in e.collectives],
            "time": e.time.model_dump(mode="json"),
            "tokens_per_s": e.tokens_per_s,
            "mfu": e.mfu,
            "tflops_per_gpu": e.tflops_per_gpu,
            "technique": e.technique,
            "phases": dict(e.phases),
            "phase_seconds": dict(e.phase_seconds),
            "resident": {k: list(v) for k, v in e.resident.items()},
            "model_states": {k: dict(v) for k, v in e.model_states.items()},
            "plan": self.plan.model_dump(mode="json"),
            "warnings": list(self.warnings),
        }


def fit_distributed(plan: Plan, layout_fields: dict[str, Any]) -> DistributedFitResult:
    """`plan` laid out over many GPUs (`layout_fields`: planner.parallel.Layout's fields)."""
    from planner.models import load_model
    from planner.parallel import estimate_distributed, layout_for_plan, make_layout

    gpu = resolve_gpu(plan.gpu, plan.gpu_memory)
    model = load_model(plan.model)
    fields = dict(layout_fields)
    if "global_batch" in fields:
        layout = make_layout(micro_batch=plan.batch, **fields)
        plan = plan.model_copy(update={"grad_accum": layout.grad_accum})
    else:
        layout = layout_for_plan(plan.batch, plan.grad_accum, **fields)
    est = estimate_distributed(plan, layout, model, gpu)
    return DistributedFitResult(plan=plan, gpu=gpu, estimate=est, warnings=plan_warnings(plan, model, gpu))
