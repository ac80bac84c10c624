"""What a model holds on the GPU between steps: parameters, buffers, quantization states, and the
size of the gradients its trainable parameters will get.

Follows what the programs do:
- full: every parameter in the plan's weight dtype, all trainable;
- LoRA (peft): base frozen in the weight dtype; adapters A (r x in) and B (out x r) on the targeted
  linears in fp32 (peft's `autocast_adapter_dtype=True` upcasts half-precision adapters);
- QLoRA: every linear of the decoder layers becomes bitsandbytes `Linear4bit` (packed uint8, two
  4-bit values a byte) with its quantization state; `prepare_model_for_kbit_training` then casts
  every other half-precision parameter (embeddings, norms, lm_head, biases) to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.architecture import LinearSpec, ModelSpec
from planner.engine.tape import DTYPE_BYTES
from planner.specs import Plan

QUANT_BLOCK = 64  # bitsandbytes 4-bit blocksize (QLoRA paper, and bnb's default)
NESTED_BLOCK = 256  # double quantization: absmax values quantized in blocks of 256


class TargetError(ValueError):
    pass


def lora_targets(spec: ModelSpec, plan: Plan) -> list[LinearSpec]:
    """Linears of one decoder layer that get adapters, as peft resolves target_modules."""
    if plan.target_list == ["all-linear"]:
        return list(spec.layer_linears)
    wanted = set(plan.target_list)
    hit = [lin for lin in spec.layer_linears if lin.name in wanted or lin.path in wanted]
    missing = wanted - {lin.name for lin in hit} - {lin.path for lin in hit}
    if missing:
        names = ", ".join(sorted({lin.name for lin in spec.layer_linears}))
        raise TargetError(
            f"lora_targets: {', '.join(sorted(missing))} not found in {spec.id} (linear modules: {names}, or all-linear)"
        )
    return hit


def quant_state_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one Linear4bit weight's QuantState (absmax, code, and the nested state)."""
    blocks = -(-n // QUANT_BLOCK)
    code = 16 * 4  # the 16-entry fp32 NF4/FP4 code book
    if not double_quant:
        return blocks * 4 + code
    nested_blocks = -(-blocks // NESTED_BLOCK)
    # uint8 absmax, its fp32 absmax per 256, the 256-entry fp32 dynamic code, an fp32 offset
    return blocks + nested_blocks * 4 + 256 * 4 + 4 + code


@dataclass(frozen=True)
class Resident:
    """Bytes resident on the GPU from model construction on (before any step)."""

    param_bytes: int
    buffer_bytes: int
    quant_state_bytes: int
    adapter_bytes: int  # part of param_bytes
    trainable_elems: int
    trainable_dtype: str  # dtype of trainable parameters (their grads and AdamW states share it)
    grad_bytes: int
    layer_grad_bytes: int  # gradients produced by one decoder layer's backward
    head_grad_bytes: int  # lm_head (+ final norm) gradients, produced first in backward
    embed_grad_bytes: int  # produced last
    trainable_tensors: int  # number of trainable parameter tensors (fused/8-bit optimizers care)
    trainable_sizes: tuple[int, ...]  # element counts of trainable tensors of one layer (8-bit states)
    other_trainable_sizes: tuple[int, ...]
    non_linear_dtype: str  # dtype of embeddings, norms, lm_head as resident
    linear_dtype: str  # "nf4"/"fp4" for QLoRA, else the dense dtype


def resident(spec: ModelSpec, plan: Plan) -> Resident:
    wdt = plan.weight_dtype
    lin_elems = spec.linear_params_per_layer * spec.num_layers
    other_elems = spec.num_params - lin_elems
    buffers = spec.buffer_bytes_fp32
    layer_linear_sizes = tuple(
        lin.in_features * lin.out_features for lin in spec.layer_linears for _ in range(lin.count)
    ) + tuple(lin.out_features for lin in spec.layer_linears for _ in range(lin.count) if lin.bias)
    layer_other_sizes = _layer_other_sizes(spec)
    head_sizes = tuple(s for s in (spec.lm_head_params, spec.final_norm_params) if s)
    embed_sizes = tuple(s for s in (spec.embedding_params, spec.position_embedding_params, spec.extra_params) if s)

    if plan.method == "full":
        nbytes = DTYPE_BYTES[wdt]
        layer = spec.params_per_layer
        return Resident(
            param_bytes=spec.num_params * nbytes,
            buffer_bytes=buffers,
            quant_state_bytes=0,
            adapter_bytes=0,
            trainable_elems=spec.num_params,
            trainable_dtype=wdt,
            grad_bytes=spec.num_params * nbytes,
            layer_grad_bytes=layer * nbytes,
            head_grad_bytes=(spec.lm_head_params + spec.final_norm_params) * nbytes,
            embed_grad_bytes=(spec.embedding_params + spec.position_embedding_params + spec.extra_params) * nbytes,
            trainable_tensors=spec.num_layers * (len(layer_linear_sizes) + len(layer_other_sizes))
            + len(head_sizes) + len(embed_sizes),
            trainable_sizes=layer_linear_sizes + layer_other_sizes,
            other_trainable_sizes=head_sizes + embed_sizes,
            non_linear_dtype=wdt,
            linear_dtype=wdt,
        )

    targets = lora_targets(spec, plan)
    r = plan.lora_rank
    adapter_sizes = tuple(
        s for lin in targets for _ in range(lin.count) for s in (r * lin.in_features, lin.out_features * r)
    )
    adapter_layer = sum(adapter_sizes)
    adapter_elems = adapter_layer * spec.num_layers
    adapter_bytes = adapter_elems * 4
    if plan.method == "lora":
        base = spec.num_params * DTYPE_BYTES[wdt]
        non_linear_dtype = linear_dtype = wdt
        qstate = 0
    else:
        linear_dtype = plan.quant
        packed = sum(-(-lin.in_features * lin.out_features // 2) * lin.count for lin in spec.layer_linears)
        bias_elems = sum(lin.out_features * lin.count for lin in spec.layer_linears if lin.bias)
        non_linear_dtype = "fp32" if plan.kbit_prep else wdt
        base = packed * spec.num_layers + (other_elems + bias_elems * spec.num_layers) * DTYPE_BYTES[non_linear_dtype]
        qstate = spec.num_layers * sum(
            quant_state_bytes(lin.in_features * lin.out_features, plan.double_quant) * lin.count
            for lin in spec.layer_linears
        )
    return Resident(
        param_bytes=base + adapter_bytes,
        buffer_bytes=buffers,
        quant_state_bytes=qstate,
        adapter_bytes=adapter_bytes,
        trainable_elems=adapter_elems,
        trainable_dtype="fp32",
        grad_bytes=adapter_bytes,
        layer_grad_bytes=adapter_layer * 4,
        head_grad_bytes=0,
        embed_grad_bytes=0,
        trainable_tensors=len(adapter_sizes) * spec.num_layers,
        trainable_sizes=adapter_sizes,
        other_trainable_sizes=(),
        non_linear_dtype=non_linear_dtype,
        linear_dtype=linear_dtype,
    )


def _layer_other_sizes(spec: ModelSpec) -> tuple[int, ...]:
    """Element counts of one layer's non-linear parameter tensors (norm weights/biases, experts)."""
    sizes: list[int] = []
    norms = spec.layer_norm_params
    while norms > 0:  # norm weights and biases are each hidden-sized
        sizes.append(min(spec.hidden_size, norms))
        norms -= spec.hidden_size
    rest = spec.layer_other_params - spec.layer_norm_params
    if rest:
        sizes.append(rest)
    return tuple(sizes)
