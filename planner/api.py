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

from planner.answer import (AllocatorDoc, AllocatorSettingDoc, CollectiveDoc, CPUMemoryDoc, FitDocument, GPUDoc, LayoutDoc,
                            LimitsDoc, MemoryDoc, ModelDoc, PhaseTimeDoc, StageDoc, SuggestionDoc, TimeDoc)
from planner.gpus import GPUSpec, resolve_gpu
from planner.result import MemoryEstimate
from planner.specs import Plan
from planner.suggest import Limits, Suggestion, Verdict, limits, single_gpu_evaluator, suggest

__all__ = ["DistributedFitResult", "FitResult", "fit", "fit_distributed", "plan_warnings"]


class ModelInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    num_params: int | None = None
    max_position_embeddings: int | None = None


class FitResult(BaseModel):
    """The answer for one plan on one card. Sizes in bytes. `to_json()` is the document a plan on
    many GPUs gives too (planner.answer.FitDocument)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    fits: bool
    gpu: GPUSpec
    model: ModelInfo
    memory: MemoryEstimate
    headroom_bytes: int = Field(description="gpu.memory_bytes - memory.device_bytes (negative: short by that much)")
    suggestions: list[Suggestion] = Field(default_factory=list)
    limits: Limits | None = Field(default=None, description="for a plan that fits: the largest batch and lengths that still fit")
    plan: Plan
    warnings: list[str] = Field(default_factory=list)
    phase_seconds: dict[str, float] = Field(default_factory=dict, description="time of each phase of one step")
    step_time: Any = Field(default=None, exclude=True, description="planner.engine.timing.StepTime (None: no profile)")
    profile_name: str = Field(default="", description="the device profile that priced the time")
    resident: dict[str, list[str]] = Field(default_factory=dict, description="models resident in each phase (roles)")
    tokens_per_step: int = 0
    allocator: Any = Field(default=None, description="planner.engine.allocator.AllocatorAnswer: the caching allocator "
                                                     "simulated over the step's trace (None: not simulated)")
    allocator_note: str = Field(default="", description="why the step was not simulated, when it was not")
    alloc_conf: str = Field(default="", description="the caching-allocator settings simulated")

    workload: Any = Field(default=None, exclude=True, description="the technique's workload (for the document)")

    def to_json(self) -> dict[str, Any]:
        """The CLI's --json document: planner.answer.FitDocument, the same for one GPU and many."""
        return self.document().to_json()

    def time_json(self) -> dict[str, Any]:
        return self.document().time.model_dump()

    def document(self) -> FitDocument:
        from planner.engine import compute
        from planner.engine.timing import step_flops, tokens_counted

        m = self.memory
        st = self.step_time
        step = st.total_s if st is not None else None
        model_f = hw_f = None
        mfu = hfu = tflops = None
        if self.workload is not None:
            model_f, hw_f = step_flops(self.workload)
            if step and (self.gpu.bf16_tflops or self.gpu.fp16_tflops):
                from planner.engine.timing import peak_flops

                peak = peak_flops(self.workload, self.gpu)
                mfu, hfu, tflops = model_f / (step * peak), hw_f / (step * peak), hw_f / step / 1e12
        opt = None
        if st is not None:
            opt = sum(ph.parts.get("optimizer", 0.0) for ph in st.phases.values()) or None
        time = TimeDoc(
            step_s=step, phases_s=dict(self.phase_seconds), compute_s=st.compute_s if st else None,
            host_s=st.host_s if st else None,
            exposed_comm_s=0.0 if step is not None else None, bubble_s=0.0 if step is not None else None,
            optimizer_s=opt, tokens_per_step=self.tokens_per_step,
            tokens_counted=tokens_counted(self.workload) if self.workload is not None else "",
            tokens_per_s=self.tokens_per_step / step if step else None, model_flops=model_f, hardware_flops=hw_f,
            mfu=mfu, hfu=hfu, tflops_per_gpu=tflops, flops_convention=FLOPS_CONVENTION,
            time_model=(f"{TIME_MODEL}; profile {self.profile_name}" if step is not None
                        else "none: no device profile for this card (give --profile FILE)"),
            phases={k: PhaseTimeDoc(step_s=v.total_s, compute_s=v.compute_s, host_s=v.host_s,
                                    exposed_comm_s=0.0, bubble_s=0.0, parts_compute_s=dict(v.parts))
                    for k, v in st.phases.items()} if st is not None else {},
        )
        from planner.engine.distributed import layout_for_plan

        layout = layout_for_plan(self.plan.batch, self.plan.grad_accum)
        return FitDocument(
            fits=self.fits, headroom_bytes=self.headroom_bytes, gpu=_gpu_doc(self.gpu), model=ModelDoc(**self.model.model_dump()),
            technique=self.plan.task, plan=self.plan.model_dump(mode="json"), layout=_layout_doc(layout),
            engine=_engine(layout, self.plan),
            memory=MemoryDoc(peak_allocated_bytes=m.peak_allocated_bytes, reserved_bytes=m.reserved_bytes,
                             device_bytes=m.device_bytes, peak_phase=m.peak_phase, stage=0, breakdown=dict(m.breakdown),
                             details=dict(m.details), device_items=dict(m.device_items),
                             outside_allocator=dict(m.outside_allocator), phases=dict(m.phases)),
            time=time, resident=dict(self.resident), allocator=allocator_doc(self.allocator, self.allocator_note,
                                                                             self.alloc_conf, self.gpu),
            suggestions=[SuggestionDoc(**s.to_json()) for s in self.suggestions],
            limits=LimitsDoc(**self.limits.model_dump()) if self.limits is not None else None,
            warnings=list(self.warnings),
        )


# what the engine's allocation trace does not cover on many GPUs yet
DISTRIBUTED_NOT_SIMULATED = ("the distributed estimate is not simulated: the engine's allocation trace covers one GPU's "
                             "step, not yet a rank's (sharded states, collectives' buffers and their streams); "
                             "reserved is the estimate's rounding model")
FLOPS_CONVENTION = ("attention counts the (query, key) pairs the kernel computes: s(s+1)/2 per sequence with "
                    "SDPA's causal kernels, s^2 with eager attention, the whole context for a decode step")
TIME_MODEL = ("op by op: every aten op of the replayed program priced by a device profile (rate curves by op size, "
              "launch and host costs), host and device overlapped until each synchronisation (planner.engine.cost)")
ROOFLINE_MODEL = "roofline: FLOPs and elementwise bytes at the card's achievable ceilings (planner.engine.compute)"


def allocator_doc(answer: Any, note: str, conf: str, gpu: GPUSpec | None) -> AllocatorDoc:
    """The `allocator` block: the simulation's figures, or why there are none."""
    if answer is None:
        return AllocatorDoc(simulated=False, not_simulated=note or "not simulated", alloc_conf=conf,
                            capacity_bytes=None, events=None, reserved_bytes=None, peak_allocated_bytes=None,
                            fits=None, oom_request_bytes=None, num_alloc_retries=None, min_capacity_bytes=None,
                            min_card_bytes=None, fragmentation_bytes=None, segments=None, settings_that_fit=[])
    a = answer
    return AllocatorDoc(
        simulated=True, not_simulated=None, alloc_conf=a.alloc_conf, capacity_bytes=a.capacity_bytes, events=a.events,
        reserved_bytes=a.reserved_bytes, peak_allocated_bytes=a.peak_allocated_bytes, fits=a.fits,
        oom_request_bytes=a.oom_request_bytes, num_alloc_retries=a.num_alloc_retries,
        min_capacity_bytes=a.min_capacity_bytes,
        min_card_bytes=a.min_capacity_bytes + (gpu.cuda_context_bytes if gpu is not None else 0),
        fragmentation_bytes=a.fragmentation_bytes, segments=a.segments,
        settings_that_fit=[AllocatorSettingDoc(**s.model_dump()) for s in a.suggestions])


def _gpu_doc(gpu: GPUSpec) -> GPUDoc:
    return GPUDoc(id=gpu.id, name=gpu.name, memory_bytes=gpu.memory_bytes)


def _layout_doc(lay: Any) -> LayoutDoc:
    return LayoutDoc(gpus=lay.gpus, gpus_per_node=lay.per_node, nodes=lay.nodes, dp=lay.dp, tp=lay.tp, pp=lay.pp,
                     sp=lay.sp, stage=lay.stage, zero=lay.zero, fsdp=lay.fsdp, engine=lay.engine_name,
                     offload=lay.offload, micro_batch=lay.micro_batch, grad_accum=lay.grad_accum,
                     global_batch=lay.batch, pp_schedule=lay.pp_schedule, pp_chunks=lay.chunks)


def _engine(layout: Any, plan: Plan) -> str:
    from planner.engine.distributed.zero import engine_description

    return engine_description(layout, plan)


def _model_info(model: Any) -> ModelInfo:
    mid = str(getattr(model, "id", None) or getattr(model, "name", "model"))
    return ModelInfo(
        id=mid,
        name=str(getattr(model, "name", None) or mid),
        num_params=getattr(model, "num_params", None),
        max_position_embeddings=getattr(model, "max_position_embeddings", None),
    )


def bf16_supported(gpu: GPUSpec) -> bool:
    return gpu.custom or gpu.bf16_tflops is not None


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
    experts = getattr(model, "layer_expert_params", 0) * getattr(model, "num_layers", 0)
    if plan.method == "qlora" and experts:
        from planner.engine.resident import resident
        from planner.engine.tape import DTYPE_BYTES
        from planner.units import format_gib

        from planner.workload import ModelUse

        trains = "optimizer" in _technique_fields(plan)
        setup = ModelUse("model", model, plan, trainable=trains).setup  # kbit preparation only when training
        dtype = resident(model, setup).non_linear_dtype
        held = experts * DTYPE_BYTES[dtype]
        out.append(
            f"method: transformers holds {mid}'s experts as fused 3-D tensors, not nn.Linear modules, so "
            f"bitsandbytes leaves them unquantized ({dtype}{', cast by kbit preparation' if dtype == 'fp32' else ''}): "
            f"{format_gib(held)} of experts where 4-bit would hold {format_gib(experts // 2)}; estimated as the program runs"
        )
    return out


def _technique_fields(plan: Plan) -> tuple[str, ...]:
    from planner.plugins import technique

    return technique(plan.task).plan_fields


def fit(plan: Plan, with_suggestions: bool = True, layout: dict[str, Any] | None = None,
        profile: str | None = None, alloc_conf: Any = None) -> "FitResult | DistributedFitResult":
    """Load the model and card the plan names, estimate, and judge. Raises ModelError/GPUError (ValueError).
    With `layout` (planner.engine.distributed.Layout's fields), the plan on many GPUs; either way
    `.to_json()` is one document (planner.answer.FitDocument). `alloc_conf`: the caching allocator's
    settings (planner.engine.alloc_conf.AllocatorConfig; default: torch's defaults). Where the engine
    traces the plan, reserved and the verdict come from the simulated allocator (planner.simulated)."""
    from planner.engine.alloc_conf import AllocatorConfig

    conf = alloc_conf if alloc_conf is not None else AllocatorConfig()
    if layout:
        return fit_distributed(plan, layout, with_suggestions, alloc_conf=conf)
    from planner.models import load_model

    gpu = resolve_gpu(plan.gpu, plan.gpu_memory)
    model = load_model(plan.model)
    from planner.engine import estimate  # after the inputs are known good: bad input is reported first
    from planner.simulated import simulated, with_simulated

    est = estimate(plan, model, gpu)
    answer, note = simulated(plan, model, gpu, conf)
    # the ratio of the simulated reserved to the estimate's, which the searches' candidates are scaled by
    ratio = 1.0
    if answer is not None:
        ratio = answer.reserved_bytes / max(est.reserved_bytes, 1)
        est = with_simulated(est, answer, gpu)
        fits = bool(answer.fits)
    else:
        fits = est.device_bytes <= gpu.memory_bytes
    suggestions: list[Suggestion] = []
    reach: Limits | None = None
    if with_suggestions:
        from planner.simulated import allocator_suggestions, judged_limits, judged_suggestions

        def scaled(p: Plan, m: Any) -> MemoryEstimate:
            e = estimate(p, m, gpu)
            reserved = int(e.reserved_bytes * ratio)
            return e.model_copy(update={"reserved_bytes": reserved, "device_bytes": reserved + gpu.cuda_context_bytes})

        evaluate = single_gpu_evaluator(model, gpu.memory_bytes, scaled)
        if fits:
            # the plan fits by the simulation's verdict even where its scaled reserved does not (the
            # allocator's free-and-retry under the card): the searches start from it all the same
            reach = limits(plan, model, evaluate, fits=True if answer is not None else None)
            if answer is not None:
                reach = judged_limits(plan, model, gpu, conf, reach)
        else:
            suggestions = suggest(plan, model, evaluate=evaluate, bf16_supported=bf16_supported(gpu))
            if answer is not None:
                suggestions = allocator_suggestions(plan, est, answer, gpu) + judged_suggestions(
                    plan, model, gpu, conf, suggestions)
    from planner.engine.timing import tokens_per_step
    from planner.plugins import technique

    workload = technique(plan.task).workload(plan, model)
    step = _step_time(workload, gpu, profile)
    return FitResult(
        fits=fits,
        gpu=gpu,
        model=_model_info(model),
        memory=est,
        headroom_bytes=gpu.memory_bytes - est.device_bytes,
        suggestions=suggestions,
        limits=reach,
        plan=plan,
        warnings=plan_warnings(plan, model, gpu),
        phase_seconds={k: v.total_s for k, v in step.phases.items()} if step is not None else {},
        step_time=step,
        profile_name=_profile_label(gpu, profile) if step is not None else "",
        resident={ph.name: [m.role for m in workload.models] for ph in workload.phases},
        tokens_per_step=tokens_per_step(workload),
        workload=workload,
        allocator=answer,
        allocator_note=note,
        alloc_conf=conf.to_conf(),
    )


def _step_time(workload: Any, gpu: GPUSpec, profile: str | None) -> Any:
    """The op-level step time on the plan's card, or None when no profile can price it (a custom
    card given only by its memory, without --profile)."""
    from planner.engine.devices import profile_for
    from planner.engine.timing import step_time
    from planner.profiles import ProfileError

    if profile is None and gpu.id == "custom":
        return None
    try:
        prof = profile_for(gpu, profile)
    except ProfileError:
        if profile is not None:
            raise
        return None
    return step_time(workload, prof)


def _profile_label(gpu: GPUSpec, profile: str | None) -> str:
    from planner.engine.devices import profile_for

    p = profile_for(gpu, profile)
    return f"{p.id}: {p.name}"


class DistributedFitResult(BaseModel):
    """A plan on many GPUs: per-rank memory of the busiest rank (and its peak in every phase of the
    technique's step), collectives, step time."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    plan: Plan
    gpu: GPUSpec
    estimate: Any
    warnings: list[str] = Field(default_factory=list)
    suggestions: list[Suggestion] = Field(default_factory=list)
    limits: Limits | None = None
    layout_fields: dict[str, Any] = Field(default_factory=dict)
    model: Any = Field(default=None, exclude=True)
    alloc_conf: str = ""

    def to_json(self) -> dict[str, Any]:
        """The CLI's --json document: planner.answer.FitDocument, the same for one GPU and many."""
        return self.document().to_json()

    def document(self) -> FitDocument:
        from planner.engine import compute

        e = self.estimate
        m = e.memory
        t = e.time
        peak = compute.peak_flops(self.gpu, self.plan.matmul_dtype)
        step = t.total_s
        tokens = int(round(e.tokens_per_s * step))
        time = TimeDoc(
            step_s=step, phases_s=dict(e.phase_seconds) or {"train": step}, compute_s=t.compute_s, host_s=None,
            exposed_comm_s=t.exposed_comm_s, bubble_s=t.bubble_s, optimizer_s=t.optimizer_s, tokens_per_step=tokens,
            tokens_counted="trained tokens over the job (global batch x length)" if e.technique == "sft"
            else "tokens of the step's training and generation phases over the job",
            tokens_per_s=e.tokens_per_s, model_flops=e.model_flops, hardware_flops=e.hardware_flops, mfu=e.mfu,
            hfu=e.hardware_flops / (step * e.layout.gpus * peak), tflops_per_gpu=e.tflops_per_gpu,
            flops_convention=FLOPS_CONVENTION,
            time_model=f"{ROOFLINE_MODEL}, with collectives and the pipeline bubble; efficiencies: {e.efficiency.get('source')}",
        )
        mem = MemoryDoc(
            peak_allocated_bytes=m.peak_allocated_bytes, reserved_bytes=m.reserved_bytes, device_bytes=m.device_bytes,
            peak_phase=m.peak_phase, stage=m.stage, breakdown=dict(m.breakdown), details=dict(m.details),
            device_items={"allocator_overhead": m.reserved_bytes - m.peak_allocated_bytes,
                          "cuda_context": m.device_bytes - m.reserved_bytes},
            outside_allocator={}, phases=dict(e.phases))
        return FitDocument(
            fits=e.fits, headroom_bytes=self.gpu.memory_bytes - m.device_bytes, gpu=_gpu_doc(self.gpu),
            model=ModelDoc(**_model_info(self.model).model_dump()) if self.model is not None else ModelDoc(id=self.plan.model, name=self.plan.model),
            technique=e.technique, plan=self.plan.model_dump(mode="json"), layout=_layout_doc(e.layout), engine=e.engine,
            memory=mem, time=time, resident={k: list(v) for k, v in e.resident.items()} or {"train": ["model"]},
            allocator=allocator_doc(None, DISTRIBUTED_NOT_SIMULATED, self.alloc_conf, None),
            suggestions=[SuggestionDoc(**s.to_json()) for s in self.suggestions],
            limits=LimitsDoc(**self.limits.model_dump()) if self.limits is not None else None,
            warnings=list(self.warnings),
            collectives=[CollectiveDoc(**c.model_dump()) for c in e.collectives],
            cpu_memory=CPUMemoryDoc(bytes_per_node=e.cpu_bytes_per_node, node_bytes=e.cpu_memory_bytes,
                                    fits=e.cpu_bytes_per_node <= e.cpu_memory_bytes),
            stages=[StageDoc(**r.model_dump()) for r in e.stages],
            model_states={k: dict(v) for k, v in e.model_states.items()},
        )


def _layout_for(plan: Plan, fields: dict[str, Any]) -> tuple[Plan, Any]:
    """The plan (grad-accum from the layout when a global batch is given) and its layout."""
    from planner.engine.distributed import layout_for_plan, make_layout

    fields = {k: v for k, v in fields.items() if v is not None}
    if "global_batch" in fields:
        layout = make_layout(micro_batch=plan.batch, **fields)
        return plan.model_copy(update={"grad_accum": layout.grad_accum}), layout
    return plan, layout_for_plan(plan.batch, plan.grad_accum, **fields)


def fit_distributed(plan: Plan, layout_fields: dict[str, Any], with_suggestions: bool = True,
                    alloc_conf: Any = None) -> DistributedFitResult:
    """`plan` laid out over many GPUs (`layout_fields`: planner.engine.distributed.Layout's fields)."""
    from planner.models import load_model
    from planner.engine.distributed import estimate_distributed

    gpu = resolve_gpu(plan.gpu, plan.gpu_memory)
    model = load_model(plan.model)
    plan, layout = _layout_for(plan, layout_fields)
    est = estimate_distributed(plan, layout, model, gpu)

    def evaluate(p: Plan, fields: dict[str, Any]) -> Verdict | None:
        try:
            p2, lay = _layout_for(p, fields)
            e = estimate_distributed(p2, lay, model, gpu)
        except ValueError:
            return None
        return Verdict(e.memory.peak_allocated_bytes, e.memory.device_bytes, e.fits)

    conf = alloc_conf.to_conf() if alloc_conf is not None else ""
    suggestions: list[Suggestion] = []
    reach: Limits | None = None
    if with_suggestions:
        fields = {k: v for k, v in layout_fields.items() if v is not None}
        if est.fits:
            reach = limits(plan, model, evaluate, fields)
        else:
            from planner.suggest import layout_changes

            suggestions = suggest(plan, model, evaluate=evaluate, layout=fields, bf16_supported=bf16_supported(gpu),
                                  layout_changes=layout_changes(layout, fields, model))
    return DistributedFitResult(plan=plan, gpu=gpu, estimate=est, warnings=plan_warnings(plan, model, gpu),
                                suggestions=suggestions, limits=reach, layout_fields=dict(layout_fields), model=model,
                                alloc_conf=conf)
