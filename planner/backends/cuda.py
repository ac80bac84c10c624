"""The `real` backend on CUDA: the technique's step on real tensors, measured by the CUDA allocator.

Follows shared/notes/heldout-protocol.md: models built with `from_config(config, dtype=...)` directly
on the GPU (random weights); QLoRA replaces every nn.Linear but lm_head by bitsandbytes Linear4bit
quantized on the GPU, then `prepare_model_for_kbit_training`, then LoRA; the peak counts from
`reset_peak_memory_stats()` after models and optimizers are built (their bytes included) through all
steps; time is the median of steps 2..n by CUDA events. An out-of-memory error is a result.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

from planner.backends.context import StepContext
from planner.backends.measurement import Measurement


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_model(plan, config: dict, device: str, train: bool, head: str = "causal_lm"):
    """The plan's model on a real device, set up as the held-out programs set it up."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from planner.backends.dryrun._build import hf_config, prepare_for_plan

    cfg = hf_config(config, use_cache=not train)
    if head == "seq_cls":
        cfg.num_labels = 1
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = cfg.eos_token_id if isinstance(getattr(cfg, "eos_token_id", None), int) else 0
    auto = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(cfg, dtype=_dtype(plan.weight_dtype), attn_implementation=plan.attn)
    if plan.method == "qlora":
        import bitsandbytes as bnb

        out_emb = model.get_output_embeddings()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child is not out_emb and name != "score":
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                            compute_dtype=torch.bfloat16, compress_statistics=plan.double_quant,
                                            quant_type=plan.quant, quant_storage=torch.uint8, device="cpu")
                    new.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                                   compress_statistics=plan.double_quant, quant_type=plan.quant,
                                                   quant_storage=torch.uint8)
                    if child.bias is not None:
                        new.bias = nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
                    setattr(parent, name, new.to(device))  # .to(cuda) quantizes, as 4-bit loading does
                    del child
    return prepare_for_plan(model, plan, train, head)


def make_optimizer(plan, params):
    import torch

    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-5)  # torch's defaults: foreach on CUDA
    if plan.optimizer == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-5)
    if plan.optimizer not in ("adamw-8bit", "paged-adamw-8bit"):
        from planner.plugins import registry

        return registry().optimizers[plan.optimizer].build(params)
    import bitsandbytes as bnb

    if plan.optimizer == "adamw-8bit":
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return bnb.optim.PagedAdamW8bit(params, lr=1e-5)


class CudaContext(StepContext):
    def __init__(self, technique, plan, config: dict) -> None:
        self.technique = technique
        self.plan = plan
        self.config = config
        self._models: dict[str, Any] = {}
        self._opts: dict[str, Any] = {}
        self.current_phase = "setup"
        from planner.models import load_model

        self.workload = technique.workload(plan, load_model(plan.model))

    def model(self, role: str):
        if role not in self._models:
            from planner.models import model_config

            use = self.workload.model(role)
            self._models[role] = build_model(use.setup, model_config(use.source), "cuda", train=use.trainable,
                                             head=use.spec.head)
        return self._models[role]

    def optimizer(self, role: str):
        if role not in self._opts:
            params = [p for p in self.model(role).parameters() if p.requires_grad]
            self._opts[role] = make_optimizer(self.workload.model(role).setup, params)
        return self._opts[role]

    def empty_cache(self) -> None:
        import torch

        torch.cuda.empty_cache()

    def token_ids(self, batch: int, seq: int):
        import torch

        return torch.randint(0, int(self.config["vocab_size"]), (batch, seq), device="cuda")

    def generate(self, model, ids, new_tokens: int):
        import torch

        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True)

    def _autocast(self):
        import torch

        if self.plan.autocast:
            return torch.autocast("cuda", dtype=_dtype(self.plan.compute_dtype))
        return contextlib.nullcontext()


def run_cuda(technique, plan, config: dict, steps: int = 3) -> Measurement:
    import torch

    t0 = time.perf_counter()
    torch.cuda.init()
    free0, total = torch.cuda.mem_get_info()
    before = torch.cuda.memory_allocated()
    ctx = CudaContext(technique, plan, config)
    versions = _versions()
    name = torch.cuda.get_device_name()
    try:
        for role in (m.role for m in ctx.workload.models):
            ctx.model(role)
            if ctx.workload.model(role).trainable:
                ctx.optimizer(role)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps):
            ctx.step_index = i
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            technique.step(ctx)
            ctx.release()  # the step's locals go when it returns
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    except torch.cuda.OutOfMemoryError:
        return Measurement(backend="real", device="cuda", oom=True, oom_phase=ctx.current_phase, device_name=name,
                           versions=versions, wall_s=time.perf_counter() - t0,
                           notes=[f"out of memory during {ctx.current_phase}"])
    peak = torch.cuda.max_memory_allocated() - before
    reserved = torch.cuda.max_memory_reserved()
    step_time = statistics.median(times[1:]) if len(times) > 1 else times[0]
    tokens = _tokens_per_step(ctx.workload)
    # the CUDA context (and anything else on the card): what was gone before torch allocated anything
    context = total - free0
    return Measurement(
        backend="real", device="cuda", peak_allocated_bytes=peak, reserved_bytes=reserved,
        cuda_context_bytes=context, step_time_s=step_time,
        tokens_per_s=tokens / step_time if step_time else None, device_name=name, versions=versions,
        wall_s=time.perf_counter() - t0,
    )


def _tokens_per_step(workload) -> int:
    """What the estimate counts (planner.engine.timing.tokens_per_step): trained, else generated tokens."""
    from planner.engine.timing import tokens_per_step

    return tokens_per_step(workload)


def _versions() -> dict[str, str]:
    from planner.backends.measurement import versions

    return versions()
