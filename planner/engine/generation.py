"""The memory timeline of `model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)`.

transformers' greedy loop with its default `DynamicCache`:
- prefill: one no-grad forward over batch x prompt tokens; each layer appends its K and V (after
  rotary) to the cache, and only the last position's logits are computed (`logits_to_keep=1`);
- then one token a step: `logits[:, -1, :]` copied to fp32, the logits processors (MinLength and
  MinNewTokensLength each clone the scores and mask EOS with torch.where), argmax, `torch.cat` of the ids; each layer's cache grows by `torch.cat`, so the
  old and new K (or V) of one layer are live together for a moment;
- the cache ends at prompt + new_tokens - 1 positions (the last token is never fed back).
KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes.
"""

from __future__ import annotations

import dataclasses

from planner.architecture import ModelSpec
from planner.engine.resident import Resident, resident
from planner.engine.tape import DTYPE_BYTES, Sym
from planner.engine.timeline import CompiledTimeline, Timeline
from planner.engine.training import layer_cfg, resident_details, run_layer
from planner.result import MemoryEstimate
from planner.specs import Plan


def kv_bytes_per_token(spec: ModelSpec, dtype: str) -> int:
    return 2 * spec.num_layers * spec.num_key_value_heads * spec.head_dim * DTYPE_BYTES[dtype]


def build(spec: ModelSpec, plan: Plan) -> tuple[CompiledTimeline, Resident, dict[str, int]]:
    res = resident(spec, plan)
    # generate runs outside any autocast region (the HF Trainer autocasts its training forward only)
    cfg = dataclasses.replace(layer_cfg(spec, plan, res, training=False), autocast=None)
    act_dtype = res.non_linear_dtype
    layer = run_layer(cfg, act_dtype, False, grad=False)
    h = spec.hidden_size
    rope = Sym(t=2 * spec.head_dim * DTYPE_BYTES[act_dtype])
    tl = Timeline()
    base = dict(parameters=Sym(c=res.param_bytes), buffers=Sym(c=res.buffer_bytes), other=Sym(c=res.quant_state_bytes))
    # Prefill: sizes per prompt token (T = batch x prompt). The cache is added at evaluation.
    embeds = Sym(t=h * DTYPE_BYTES[act_dtype])  # `inputs_embeds`, referenced until the forward returns
    for peak in layer.peaks:
        tl.add("prefill", "last decoder layer", **base, activations=peak + rope + embeds)
    tl.add("prefill", "final norm and last-position logits", **base, activations=Sym(t=h * DTYPE_BYTES[act_dtype] * 2))
    return tl.compiled(), res, resident_details(res)


def evaluate(timeline: CompiledTimeline, res: Resident, extra: dict[str, int], batch: int, prompt_len: int,
             new_tokens: int, spec: ModelSpec, plan: Plan, cuda_context_bytes: int, workspace: int) -> MemoryEstimate:
    from planner.engine.evaluate import finish

    # K and V come out in the hidden states' dtype: dense projections in the weights' dtype, and
    # Linear4bit / peft's LoRA cast their outputs back to their input's dtype
    kv_dtype = res.non_linear_dtype
    per_tok = kv_bytes_per_token(spec, kv_dtype)
    B, P, N = batch, prompt_len, new_tokens
    V = spec.vocab_size
    ids = B * (P + N) * 8 * 2  # input_ids and attention_mask (int64) at their final length
    prefill_kv = per_tok * B * P
    final_kv = per_tok * B * (P + N - 1)
    layer_kv = final_kv // spec.num_layers // 2  # one layer's K (or V): the torch.cat transient
    logits_dtype = DTYPE_BYTES[res.non_linear_dtype]
    # The last-position logits, and in fp32: their copy; the output of MinLengthLogitsProcessor (a
    # clone or torch.where); MinNewTokensLengthLogitsProcessor's clone and torch.where result (the
    # two processors transformers 5.24 builds for min_new_tokens=n); and the previous step's scores,
    # rebound only after the processors return.
    step_logits = B * V * (logits_dtype + 5 * 4)

    prefill = finish(timeline, extra, B * P, P, cuda_context_bytes, workspace,
                     kv={"kv_cache": prefill_kv, "other": ids})
    # Decode: the last step dominates (largest cache); its transients are per-token-of-batch small.
    decode_alloc = {"kv_cache": final_kv + layer_kv, "activations": step_logits, "other": ids}
    base_bytes = res.param_bytes + res.buffer_bytes + res.quant_state_bytes
    decode_total = base_bytes + sum(decode_alloc.values()) + prefill.details.get("cublas_workspace", 0)
    phases = dict(prefill.phases)
    phases["prefill"] = prefill.peak_allocated_bytes
    phases["decode"] = decode_total
    if decode_total <= prefill.peak_allocated_bytes:
        return prefill.model_copy(update={"phases": phases})
    breakdown = {k: 0 for k in prefill.breakdown}
    breakdown["parameters"] = res.param_bytes
    breakdown["buffers"] = res.buffer_bytes
    breakdown["other"] = res.quant_state_bytes + ids + prefill.details.get("cublas_workspace", 0)
    breakdown["kv_cache"] = final_kv + layer_kv
    breakdown["activations"] = step_logits
    total = sum(breakdown.values())
    from planner.engine.runtime import reserved_bytes

    reserved = reserved_bytes(total, sum(1 for v in breakdown.values() if v))
    details = {k: v for k, v in prefill.details.items() if k in ("cublas_workspace", "lora_adapters", "quant_state")}
    details["step_logits"] = step_logits
    return MemoryEstimate(
        peak_allocated_bytes=total,
        reserved_bytes=reserved,
        device_bytes=reserved + cuda_context_bytes,
        peak_phase="decode",
        breakdown=breakdown,
        details=details,
        device_items={"allocator_overhead": reserved - total, "cuda_context": cuda_context_bytes},
        phases=phases,
    )
