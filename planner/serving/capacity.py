"""How much KV cache a serving engine gets on a card, sized the way vLLM sizes it.

vLLM V1 (`gpu_worker.determine_available_memory`) profiles one forward at the largest batch and
gives the KV cache what is left of the utilisation target::

    kv_budget = total x gpu_memory_utilization - weights - peak activation - non-torch memory

`total` is what CUDA reports (GPUSpec.memory_bytes). Each term, per rank (tensor parallelism
splits the weights and the KV heads):

weights
    Linears of the decoder layers (and MoE experts) in `weights_dtype`; embeddings, lm_head, norms
    and biases in the serving dtype (vLLM's fp8/int8/bitsandbytes schemes leave lm_head and
    embeddings unquantized). fp8/int8 add one fp32 scale per output channel; nf4 adds bitsandbytes'
    QuantState (blocks of 64, double quantization). Linears, embeddings and lm_head are split over
    `tp` (column/row-parallel layers, VocabParallelEmbedding, ParallelLMHead); norms are replicated.
    Plus rotary models' cos/sin cache, `max_position_embeddings x head_dim` in the serving dtype:
    Llama-3.1-8B is then 14.99 GiB, the "Model loading took 14.99 GiB" of vLLM's log (see SOURCES).
peak activation
    The profiling run: a forward over `max_num_batched_tokens` tokens, then a dummy sampler run
    over `max_num_seqs` rows of logits. The sampler dominates on vLLM's default limits: five
    start-up logs (SOURCES) give 38.4 bytes per logit element (max_num_seqs x vocab) to within
    0.5 %, plus the hidden states of the forward (max_num_batched_tokens x hidden x 2 bytes).
    The forward's own peak (MLP intermediates) is taken when larger.
non-torch memory
    0.13 GiB with one GPU, 0.55 GiB with tensor parallelism (NCCL and custom all-reduce buffers),
    as the same logs report it.
CUDA graphs, CUDA context
    Not deducted: vLLM captures graphs after sizing the cache, inside the 1 - utilisation reserve,
    and the context sits outside torch. The report checks the reserve holds both (context from the
    GPU catalog, graphs up to ~1 GiB as the logs show) and warns otherwise.

KV per token = 2 (K and V) x layers x kv_heads x head_dim x bytes (the PagedAttention paper's
formula: OPT-13B in 16-bit is 800 KiB). Sliding-window layers hold at most `sliding_window` tokens
(vLLM's hybrid allocator frees blocks that left the window). Blocks hold `block_size` tokens of
every layer; vLLM's `num_gpu_blocks = kv_budget // (block_size x kv_bytes_per_token_per_rank)`.
The simulator counts in layer-blocks (one layer's block) so that sliding layers can stop growing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from planner.architecture import ModelSpec
from planner.gpus import GPUSpec
from planner.serving.specs import ServeInputError, ServeSpec

GiB = 1 << 30

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "nf4": 0.5}
KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# ---- constants, each with its source ------------------------------------------------------------
SAMPLER_BYTES_PER_LOGIT = 38.4
NON_TORCH_BYTES_SINGLE = round(0.13 * GiB)
NON_TORCH_BYTES_TP = round(0.55 * GiB)
CUDA_GRAPH_BYTES = 1 * GiB
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize
NF4_NESTED_BLOCK = 256  # double quantization of the absmax values
# vLLM `EngineArgs.get_batch_defaults` (`vllm serve`, i.e. UsageContext.OPENAI_API_SERVER)
LARGE_CARD_BYTES = 70 * GiB
LIMITS_LARGE = (8192, 1024)  # (max_num_batched_tokens, max_num_seqs) on >= 70 GiB cards other than A100
LIMITS_SMALL = (2048, 256)

_VLLM_LOGS = ("llm-d/llm-d-benchmark config_explorer/empirical-vllm-memory-results.md: vLLM start-up logs on H100 "
              "(79.18 GiB), max_model_len 16000, default limits (8192 batched tokens, 1024 sequences)")
SOURCES: dict[str, str] = {
    "kv_budget": "vllm/v1/worker/gpu_worker.py determine_available_memory: requested_memory (total x utilization) "
                 "- non_kv_cache_memory (weights + torch peak increase of profile_run + non-torch increase)",
    "weights": "parameters in their dtypes plus the rotary cos/sin cache; Llama-3.1-8B: 14.99 GiB as in " + _VLLM_LOGS,
    "activation_peak": f"{SAMPLER_BYTES_PER_LOGIT} B per logit element of the dummy sampler run (max_num_seqs x vocab) "
                       "plus max_num_batched_tokens x hidden x 2 B; fitted to Llama-3.1-8B 4.76 GiB, Qwen3-0.6B 5.56, "
                       "Qwen3-32B 5.64, Llama-3.3-70B TP2 4.84, gpt-oss-20b 7.38 (all within 0.5 %) in " + _VLLM_LOGS,
    "non_torch": "0.13 GiB on one GPU, 0.55 GiB with TP=2 (Llama-3.3-70B-FP8), as reported in " + _VLLM_LOGS,
    "cuda_graphs": "not deducted from the budget (captured after the KV cache is allocated); -0.88 to +1.03 GiB "
                   "reported in " + _VLLM_LOGS + "; 1 GiB assumed when checking the reserve",
    "cuda_context": "GPU catalog (measured on the H200: 0.51 GiB)",
    "limits": "vllm/engine/arg_utils.py get_batch_defaults: cards with >= 70 GiB and not A100 get "
              "max_num_batched_tokens 8192 / max_num_seqs 1024 for `vllm serve`, others 2048 / 256",
    "kv_per_token": "2 x layers x kv_heads x head_dim x bytes (Kwon et al. 2023, arXiv:2309.06180: OPT-13B 800 KiB)",
    "nf4": "bitsandbytes QuantState: fp32 absmax per 64 weights, double-quantized to uint8 with an fp32 absmax per 256",
}


# ---- resolved setup --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """A ServeSpec with its model, card, dtypes, limits and per-rank shapes resolved."""

    spec: ServeSpec
    model: ModelSpec
    gpu: GPUSpec
    tp: int
    serving_dtype: str  # activations, embeddings, lm_head, norms
    weights_dtype: str  # decoder linears and experts
    kv_dtype: str
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    heads_per_rank: int
    kv_heads_per_rank: int
    kv_heads_replicated: bool
    full_layers: int
    sliding_layers: int
    window: int | None  # tokens a sliding layer keeps; None without sliding layers

    @property
    def kv_layer_token_bytes_per_rank(self) -> int:
        """K and V of one token in one layer on one rank."""
        return 2 * self.kv_heads_per_rank * self.model.head_dim * KV_DTYPE_BYTES[self.kv_dtype]

    def layer_blocks(self, tokens: int) -> int:
        """Layer-blocks (one layer's block of `block_size` tokens) a sequence of `tokens` tokens holds."""
        bs = self.block_size
        n = self.full_layers * (-(-tokens // bs))
        if self.sliding_layers:
            n += self.sliding_layers * (-(-min(tokens, self.window or tokens) // bs))
        return n


def serving_dtype(model: ModelSpec, gpu: GPUSpec) -> str:
    """vLLM's dtype='auto': the config's dtype, float32 served in 16 bits, bf16 as fp16 on cards without bf16."""
    has_bf16 = gpu.bf16_tflops is not None or gpu.custom
    dt = model.torch_dtype
    if dt == "fp32":
        return "bf16" if has_bf16 else "fp16"
    if dt == "bf16" and not has_bf16:
        return "fp16"
    return dt


def engine_limits(gpu: GPUSpec) -> tuple[int, int]:
    """vLLM's default (max_num_batched_tokens, max_num_seqs) for `vllm serve` on this card."""
    name = f"{gpu.id} {gpu.name}".lower()
    if gpu.memory_bytes >= LARGE_CARD_BYTES and "a100" not in name:
        return LIMITS_LARGE
    return LIMITS_SMALL


def attention_layout(model: ModelSpec, raw_config: dict[str, Any] | None) -> tuple[int, int, int | None]:
    """(full-attention layers, sliding-window layers, window), as transformers' layer_types assigns them."""
    layers = model.num_layers
    window = model.sliding_window
    if not window:
        return layers, 0, None
    types = (raw_config or {}).get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        sliding = sum(1 for t in types if t == "sliding_attention")
    elif model.model_type == "gemma2":
        sliding = (layers + 1) // 2  # Gemma2Config: layer i slides when (i + 1) % 2, i.e. even i
    else:
        sliding = layers  # mistral / phi3 / qwen2 with use_sliding_window: every layer
    return layers - sliding, sliding, (window if sliding else None)


def resolve(spec: ServeSpec) -> Setup:
    """Load the model and card, fill vLLM's defaults, check tensor parallelism and lengths."""
    from planner.gpus import resolve_gpu
    from planner.models import load_model, model_config

    try:
        model = load_model(spec.model)
        raw = model_config(spec.model)
        gpu = resolve_gpu(spec.gpu, spec.gpu_memory)
    except ValueError as e:  # ModelError, GPUError
        raise ServeInputError(str(e)) from None
    tp = spec.tp
    if model.num_attention_heads % tp:
        raise ServeInputError(
            f"tp: {tp} does not divide the {model.num_attention_heads} attention heads of {model.id} (vLLM requires it)"
        )
    kv = model.num_key_value_heads
    if kv % tp == 0:
        kv_rank, replicated = kv // tp, False
    elif tp % kv == 0:
        kv_rank, replicated = 1, True  # vLLM replicates KV heads when tp > num_kv_heads
    else:
        raise ServeInputError(f"tp: {tp} neither divides nor is a multiple of the {kv} KV heads of {model.id}")
    sdt = serving_dtype(model, gpu)
    wdt = spec.weights_dtype or sdt
    if wdt in ("bf16", "fp16", "fp32"):
        sdt = wdt  # a dense weights dtype is vLLM's --dtype: activations follow it
    kvdt = sdt if spec.kv_dtype == "auto" else spec.kv_dtype
    context = model.max_position_embeddings
    max_len = spec.max_model_len if spec.max_model_len is not None else context
    if max_len > context:
        raise ServeInputError(
            f"max-model-len: {max_len} is beyond {model.id}'s context of {context} tokens (max_position_embeddings)"
        )
    d_tokens, d_seqs = engine_limits(gpu)
    seqs = spec.max_num_seqs if spec.max_num_seqs is not None else d_seqs
    tokens = spec.max_num_batched_tokens if spec.max_num_batched_tokens is not None else d_tokens
    if tokens < seqs:
        if spec.max_num_batched_tokens is not None:
            raise ServeInputError(
                f"max-num-batched-tokens: {tokens} is below max-num-seqs {seqs} (vLLM requires tokens >= sequences)"
            )
        tokens = seqs
    full, sliding, window = attention_layout(model, raw)
    return Setup(
        spec=spec, model=model, gpu=gpu, tp=tp, serving_dtype=sdt, weights_dtype=wdt, kv_dtype=kvdt,
        block_size=spec.block_size, max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=tokens,
        heads_per_rank=model.num_attention_heads // tp, kv_heads_per_rank=kv_rank, kv_heads_replicated=replicated,
        full_layers=full, sliding_layers=sliding, window=window,
    )  # fmt: skip


# ---- the terms ----------------------------------------------------------------------------------
def kv_bytes_per_token(model: ModelSpec, kv_dtype: str, kv_heads: int | None = None) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes: one token of context in every layer."""
    heads = model.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * model.num_layers * heads * model.head_dim * KV_DTYPE_BYTES[kv_dtype]


def nf4_state_bytes(n: int) -> int:
    """bitsandbytes QuantState of one n-element 4-bit weight with double quantization."""
    blocks = -(-n // NF4_BLOCK)
    nested = -(-blocks // NF4_NESTED_BLOCK)
    return blocks + nested * 4 + 256 * 4 + 4 + 16 * 4


class WeightBytes(BaseModel):
    """Weights on one rank, by kind."""

    model_config = ConfigDict(frozen=True)

    quantizable: int  # decoder linears' weights and MoE experts, in weights_dtype
    dense: int  # embeddings, lm_head, norms, biases, router, in the serving dtype
    scales: int  # fp8/int8 per-channel scales, nf4 quant states
    rotary_cache: int
    total: int


def weight_bytes(setup: Setup) -> WeightBytes:
    m, tp = setup.model, setup.tp
    layers = m.num_layers
    lin_w = sum(lin.in_features * lin.out_features * lin.count for lin in m.layer_linears)
    lin_b = sum(lin.out_features * lin.count for lin in m.layer_linears if lin.bias)
    quantizable = layers * (lin_w + m.layer_expert_params)
    split_dense = layers * lin_b + m.embedding_params + m.lm_head_params
    replicated = m.num_params - quantizable - split_dense  # norms, router, learned positions, extras
    sb = DTYPE_BYTES[setup.serving_dtype]
    wdt = setup.weights_dtype
    q = math.ceil(quantizable / tp * DTYPE_BYTES[wdt])
    scales = 0
    if wdt in ("fp8", "int8"):
        outs = sum(lin.out_features * lin.count for lin in m.layer_linears)
        expert_outs = m.num_experts * (2 * m.intermediate_size + m.hidden_size) if m.num_experts else 0
        scales = 4 * layers * (outs + expert_outs) // tp
    elif wdt == "nf4":
        per_layer = sum(nf4_state_bytes(lin.in_features * lin.out_features // tp) * lin.count for lin in m.layer_linears)
        if m.layer_expert_params:
            per_layer += nf4_state_bytes(m.layer_expert_params // tp)
        scales = layers * per_layer
    dense = math.ceil(split_dense / tp * sb) + int(replicated * sb)
    rotary = 0 if m.model_type in ("gpt2", "opt") else m.max_position_embeddings * m.head_dim * int(sb)
    return WeightBytes(quantizable=q, dense=dense, scales=scales, rotary_cache=rotary,
                       total=q + dense + scales + rotary)  # fmt: skip


def activation_peak(setup: Setup) -> tuple[int, int, int]:
    """(peak, forward, sampler) bytes of vLLM's profiling run on one rank."""
    m = setup.model
    act = DTYPE_BYTES[setup.serving_dtype]
    tokens, seqs = setup.max_num_batched_tokens, setup.max_num_seqs
    h, hd = m.hidden_size, m.head_dim
    qkv = (setup.heads_per_rank + 2 * setup.kv_heads_per_rank) * hd
    inter = m.intermediate_size * (m.experts_per_token or 1) // setup.tp
    mlp = (3 if m.gated_mlp else 1) * inter  # gate_up (2I) and the activation (I), or fc1 alone
    forward = int(tokens * (2 * h + max(qkv, mlp)) * act)
    sampler = int(seqs * m.vocab_size * SAMPLER_BYTES_PER_LOGIT + tokens * h * act)
    return max(forward, sampler), forward, sampler


# ---- the report ---------------------------------------------------------------------------------
class MemoryReport(BaseModel):
    """Bytes on one rank."""

    model_config = ConfigDict(frozen=True)

    total: int
    requested: int  # total x gpu_memory_utilization
    weights: int
    activation_peak: int
    activation_forward: int
    activation_sampler: int
    non_torch: int
    kv_budget: int
    kv_allocated: int  # blocks x block bytes
    cuda_context: int
    cuda_graphs_estimate: int
    weights_detail: WeightBytes


class KVCacheReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    bytes_per_token: int  # whole model (all ranks, heads counted once)
    bytes_per_token_per_rank: int
    dtype: str
    block_size: int
    blocks: int  # vLLM's num_gpu_blocks
    block_bytes_per_rank: int
    tokens: int  # blocks x block_size
    tokens_per_sequence: int  # prompt + new tokens the concurrency figure is for
    max_concurrent_sequences: int  # sequences of that length the blocks hold at once
    scheduler_limit: int  # max_num_seqs
    max_concurrency_at_max_model_len: float  # vLLM's "Maximum concurrency for N tokens per request"
    kv_heads_per_rank: int
    kv_heads_replicated: bool
    sliding_window: int | None
    sliding_layers: int


class CapacityReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    gpu: str
    tp: int
    serving_dtype: str
    weights_dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    fits: bool
    reason: str | None
    memory: MemoryReport
    kv_cache: KVCacheReport
    layer_blocks: int  # blocks x layers: the pool the simulator allocates from
    warnings: list[str]
    sources: dict[str, str]


def max_len_for(setup: Setup, layer_blocks: int) -> int:
    """The longest sequence `layer_blocks` can hold (vLLM's 'estimated maximum model length')."""
    lo, hi = 0, setup.model.max_position_embeddings
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if setup.layer_blocks(mid) <= layer_blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo


def capacity(setup: Setup, tokens_per_sequence: int) -> CapacityReport:
    """KV-cache capacity of `setup`; `fits` False (with `reason`) where vLLM would refuse to start."""
    m, gpu = setup.model, setup.gpu
    total = gpu.memory_bytes
    util = setup.spec.gpu_memory_utilization
    requested = int(total * util)
    w = weight_bytes(setup)
    peak, fwd, sampler = activation_peak(setup)
    non_torch = NON_TORCH_BYTES_TP if setup.tp > 1 else NON_TORCH_BYTES_SINGLE
    budget = requested - w.total - peak - non_torch
    per_rank_tok = kv_bytes_per_token(m, setup.kv_dtype, setup.kv_heads_per_rank)
    block_bytes = setup.block_size * per_rank_tok
    blocks = max(budget, 0) // block_bytes
    pool = blocks * m.num_layers
    warnings: list[str] = []
    reason: str | None = None
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    per = "per rank " if setup.tp > 1 else ""
    if w.total > total:
        reason = (f"weights alone need {gib(w.total)} {per}in {setup.weights_dtype}, more than the card's {gib(total)}; "
                  "use more tensor parallelism, a smaller weights dtype or a bigger card")
    elif budget <= 0:
        reason = (f"no memory for the KV cache: {gib(requested)} requested ({util:g} of {gib(total)}) - weights "
                  f"{gib(w.total)} - activation peak {gib(peak)} - non-torch {gib(non_torch)} = {gib(budget)} "
                  "(vLLM: 'No available memory for the cache blocks')")
    elif total - gpu.cuda_context_bytes < requested:
        reason = (f"gpu-memory-utilization {util:g} asks for {gib(requested)} but only {gib(total - gpu.cuda_context_bytes)} "
                  "is free after the CUDA context (vLLM refuses to start); lower it")
    elif setup.layer_blocks(setup.max_model_len) > pool:
        need = setup.layer_blocks(setup.max_model_len) // m.num_layers * block_bytes
        reason = (f"one sequence of max-model-len {setup.max_model_len} needs {gib(need)} of KV cache but only "
                  f"{gib(blocks * block_bytes)} is available; the estimated maximum model length is "
                  f"{max_len_for(setup, pool)} (lower --max-model-len or raise --gpu-memory-utilization)")
    reserve = total - requested
    outside = gpu.cuda_context_bytes + CUDA_GRAPH_BYTES
    if reason is None and reserve < outside:
        warnings.append(
            f"gpu-memory-utilization {util:g} leaves {gib(reserve)} outside vLLM's budget; the CUDA context "
            f"({gib(gpu.cuda_context_bytes)}) and CUDA graphs (up to ~1 GiB) live there"
        )
    if gpu.bf16_tflops is None and setup.serving_dtype == "fp16" and m.torch_dtype == "bf16":
        warnings.append(f"{gpu.name} has no bf16: served in fp16, as vLLM does")
    if setup.kv_heads_replicated:
        warnings.append(f"tp {setup.tp} > {m.num_key_value_heads} KV heads: each rank holds a replica of one KV head")
    seq_blocks = setup.layer_blocks(max(tokens_per_sequence, 1))
    kv = KVCacheReport(
        bytes_per_token=kv_bytes_per_token(m, setup.kv_dtype),
        bytes_per_token_per_rank=per_rank_tok,
        dtype=setup.kv_dtype,
        block_size=setup.block_size,
        blocks=int(blocks),
        block_bytes_per_rank=block_bytes,
        tokens=int(blocks * setup.block_size),
        tokens_per_sequence=tokens_per_sequence,
        max_concurrent_sequences=int(pool // seq_blocks) if seq_blocks else 0,
        scheduler_limit=setup.max_num_seqs,
        max_concurrency_at_max_model_len=round(pool / max(setup.layer_blocks(setup.max_model_len), 1), 2),
        kv_heads_per_rank=setup.kv_heads_per_rank,
        kv_heads_replicated=setup.kv_heads_replicated,
        sliding_window=setup.window,
        sliding_layers=setup.sliding_layers,
    )
    mem = MemoryReport(
        total=total, requested=requested, weights=w.total, activation_peak=peak, activation_forward=fwd,
        activation_sampler=sampler, non_torch=non_torch, kv_budget=budget, kv_allocated=int(blocks * block_bytes),
        cuda_context=gpu.cuda_context_bytes, cuda_graphs_estimate=CUDA_GRAPH_BYTES, weights_detail=w,
    )  # fmt: skip
    return CapacityReport(
        model=m.id, gpu=gpu.id, tp=setup.tp, serving_dtype=setup.serving_dtype, weights_dtype=setup.weights_dtype,
        max_model_len=setup.max_model_len, max_num_seqs=setup.max_num_seqs,
        max_num_batched_tokens=setup.max_num_batched_tokens, gpu_memory_utilization=util,
        fits=reason is None, reason=reason, memory=mem, kv_cache=kv, layer_blocks=int(pool),
        warnings=warnings, sources=dict(SOURCES),
    )  # fmt: skip
