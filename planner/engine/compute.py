"""FLOPs of a training step and their time on a GPU (a roofline with achievable-efficiency factors).

FLOPs (forward, per token, one decoder layer; every matmul counted as 2·in·out):
- every linear of the layer (q and GQA-sized k/v, o, gated MLP's gate/up/down or GPT's fc1/fc2),
  MoE: the router plus `experts_per_token` experts;
- attention: QKᵀ and attention·V, 2·heads·head_dim FLOPs each per (query, key) pair that the kernel
  computes. ONE convention, for FLOPs and time alike: the pairs the kernel executes. SDPA / flash
  kernels skip what the causal mask removes: s(s+1)/2 pairs per sequence (a sliding window w keeps
  w(w+1)/2 + (s−w)·w); eager attention computes all s² scores and masks them afterwards; a decode
  step's token attends to its whole context. So achieved FLOP/s can never exceed the card's peak, and
  with eager (materialised) attention this is exactly Megatron's formula, whose 4·b·s²·h counts all s².
- lm_head: 2·h·V per token (the loss and softmax are not matmuls).
A training step is forward + backward = 3× forward for full training (backward computes the input and
the weight gradients); frozen linears (LoRA, QLoRA) need only input gradients: 2× forward. Full
recompute (gradient checkpointing) adds one more forward of the decoder layers (not of lm_head).
With GPT shapes this is exactly Megatron's F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)).
"Model FLOPs" (for MFU) leave the recompute out; "hardware FLOPs" include it.

Time (per micro-batch, one rank): matmul FLOPs / (peak · matmul ceiling · software efficiency)
plus memory-bound bytes / (bandwidth · memory ceiling · software efficiency), where the memory-bound
bytes are the elementwise kernels' reads and writes (norms, activations, residual adds, dropout,
rotary, materialised attention scores, QLoRA dequantisation) counted per token (`TRAFFIC`); backward
moves twice the forward's bytes.

Efficiency, ONE set per GPU type (`efficiency(gpu)`):
- ceilings: the fraction of the datasheet peak a large bf16 matmul reaches, and of the datasheet
  bandwidth a device copy reaches. H200: measured here (788.8/989 TFLOP/s, 4258.8/4800 GB/s,
  shared/reference/measured_ceilings.csv). A100 SXM 267.9/312 and H100 SXM 792.1/989: the "Maximum
  Achievable Matmul FLOPS" table of stas00/ml-engineering (compute/accelerator/README.md); MI300X
  781.9/1307.4 from the same table. Memory fractions and unlisted cards: the H200's measured ones.
- SOFTWARE_EFFICIENCY: what a real training program reaches of those ceilings (kernel shapes,
  launches, the optimizer, data loading...): 0.877, derived ONCE from the one documented measurement
  without model parallelism, Megatron-LM's 1.7B GPT on 32 A100s (Narayanan et al. 2021 Table 1
  row 1: t = p = 1, 137 TFLOP/s): the factor for which this estimator reproduces that row (assuming
  micro-batch 1 and the 1F1B schedule, which the table does not state). The same factor serves every
  card; the other nine rows of the table are predictions (tests/test_parallel_megatron.py re-derives
  the factor and checks every row within 15%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from planner.architecture import ModelSpec
from planner.gpus import GPUSpec

Style = Literal["hf", "megatron"]

SOFTWARE_EFFICIENCY = 0.877  # derived from Megatron Table 1 row 1 (see the module doc)
H200_MATMUL = 788.8 / 989.0
H200_COPY = 4258.8 / 4800.0
FP32_PEAK_FRACTION = 1 / 16  # fp32 without tensor cores is ~1/16 of dense bf16 (A100 19.5/312, H100 67/989)


@dataclass(frozen=True)
class Efficiency:
    matmul: float  # fraction of the dense half-precision peak a large matmul reaches
    memory: float  # fraction of the datasheet bandwidth a device copy reaches
    software: float  # fraction of those ceilings a training program reaches
    source: str


_MAMF = "Maximum Achievable Matmul FLOPS, stas00/ml-engineering compute/accelerator/README.md"
CEILINGS: dict[str, tuple[float, float, str]] = {
    "a100-40gb": (267.9 / 312, H200_COPY, f"A100 SXM MAMF 267.9/312 ({_MAMF}); memory: H200's measured fraction"),
    "a100-80gb": (267.9 / 312, H200_COPY, f"A100 SXM MAMF 267.9/312 ({_MAMF}); memory: H200's measured fraction"),
    "h100-sxm": (792.1 / 989, H200_COPY, f"H100 SXM MAMF 792.1/989 ({_MAMF}); memory: H200's measured fraction"),
    "mi300x": (781.9 / 1307.4, H200_COPY, f"MI300X MAMF 781.9 TFLOP/s ({_MAMF}); memory: H200's measured fraction"),
}


def efficiency(gpu: GPUSpec) -> Efficiency:
    """The card's achievable fractions: its own measurement, a published one, or the H200's."""
    if gpu.measured is not None and gpu.bf16_tflops and gpu.mem_bandwidth_gb_per_s:
        return Efficiency(gpu.measured.bf16_matmul_tflops / gpu.bf16_tflops,
                          gpu.measured.copy_gb_per_s / gpu.mem_bandwidth_gb_per_s, SOFTWARE_EFFICIENCY,
                          f"measured on this card ({gpu.measured.how or gpu.measured.date})")
    key = gpu.id.split("@")[0]
    if key in CEILINGS:
        mm, mem, src = CEILINGS[key]
        return Efficiency(mm, mem, SOFTWARE_EFFICIENCY, src)
    return Efficiency(H200_MATMUL, H200_COPY, SOFTWARE_EFFICIENCY, "not measured: the H200's measured fractions")


def peak_flops(gpu: GPUSpec, dtype: str) -> float:
    """Dense peak FLOP/s for matmuls in `dtype` (fp32: a fraction of the half-precision peak)."""
    half = (gpu.bf16_tflops if dtype == "bf16" else gpu.fp16_tflops) or gpu.fp16_tflops or gpu.bf16_tflops
    if not half:
        raise ValueError(f"gpu: {gpu.id} has no tensor-core FLOP/s in the catalog; time cannot be estimated")
    return half * 1e12 * (FP32_PEAK_FRACTION if dtype == "fp32" else 1.0)


# ---- FLOPs -------------------------------------------------------------------------------------------
def linear_flops_per_token(spec: ModelSpec) -> float:
    """Forward matmul FLOPs of one decoder layer's linears per token (MoE: router + active experts)."""
    dense = sum(2 * lin.in_features * lin.out_features * lin.count for lin in spec.layer_linears)
    if spec.num_experts:
        per_expert = spec.layer_expert_params / spec.num_experts
        dense += 2 * spec.experts_per_token * per_expert + 2 * spec.layer_router_params
    return float(dense)


def attention_pairs_per_token(spec: ModelSpec, seq: int, causal: bool = True) -> float:
    """(query, key) pairs a kernel computes per token of a sequence of `seq` tokens.

    causal (SDPA / flash kernels on a causal mask): s(s+1)/2 per sequence, or with a sliding window w
    < s: w(w+1)/2 + (s−w)·w. Not causal: every query meets all `seq` keys (eager attention computes the
    masked scores too; a decode step attends to its whole context of `seq` tokens)."""
    s = seq
    if not causal:
        return float(s)
    w = spec.sliding_window
    pairs = w * (w + 1) / 2 + (s - w) * w if w and s > w else s * (s + 1) / 2
    return pairs / s


def attention_flops_per_token(spec: ModelSpec, seq: int, causal: bool = True) -> float:
    """QKᵀ + attention·V per token, forward: 2 · 2 · heads·head_dim per computed pair."""
    return 4.0 * attention_pairs_per_token(spec, seq, causal) * spec.num_attention_heads * spec.head_dim


def lora_flops_per_token(spec: ModelSpec, rank: int, targets: list) -> float:
    """Forward FLOPs of the LoRA adapters of one layer per token: 2·r·(in + out) per adapted linear."""
    return float(sum(2 * rank * (lin.in_features + lin.out_features) * lin.count for lin in targets))


def has_head(part: ModelSpec) -> bool:
    """Whether this (part of the) model computes the logits: an lm_head, or embeddings tied to it."""
    return part.lm_head_params > 0 or (part.tie_word_embeddings and part.embedding_params > 0)


def head_flops_per_token(spec: ModelSpec) -> float:
    return 2.0 * spec.hidden_size * spec.vocab_size


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch (or of a whole step, when summed) on one rank."""

    forward: float
    backward: float
    recompute: float

    @property
    def model(self) -> float:
        """forward + backward (what MFU counts)."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.forward + self.backward + self.recompute

    def __add__(self, o: "StepFlops") -> "StepFlops":
        return StepFlops(self.forward + o.forward, self.backward + o.backward, self.recompute + o.recompute)

    def __mul__(self, k: float) -> "StepFlops":
        return StepFlops(self.forward * k, self.backward * k, self.recompute * k)


def micro_batch_flops(part: ModelSpec, tokens: int, seq: int, *, method: str = "full", grad_ckpt: bool = False,
                      lora_rank: int = 0, lora_targets: list | None = None, with_head: bool = True,
                      causal: bool = True) -> StepFlops:
    """FLOPs of one micro-batch of `tokens` tokens through `part` (a whole model, or one rank's share
    of it from shard.rank_spec: its layers, heads/t, MLP width/t, vocab/t). `causal`: attention by a
    kernel that skips causally masked pairs (SDPA), else all `seq` keys per query (eager, decode)."""
    lin = linear_flops_per_token(part)
    att = attention_flops_per_token(part, seq, causal)
    ada = lora_flops_per_token(part, lora_rank, lora_targets or []) if method != "full" else 0.0
    layer_fwd = (lin + att + ada) * tokens * part.num_layers
    # backward: input grads of every matmul (1x) + weight grads of trainable linears (1x); attention 2x
    base_bwd = 2 * lin if method == "full" else lin
    layer_bwd = (base_bwd + 2 * att + 2 * ada) * tokens * part.num_layers
    head_fwd = head_flops_per_token(part) * tokens if with_head and has_head(part) else 0.0
    head_bwd = head_fwd * (2 if method == "full" else 1)
    return StepFlops(layer_fwd + head_fwd, layer_bwd + head_bwd, layer_fwd if grad_ckpt else 0.0)


def megatron_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021, eq. (3): F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) (with full recompute)."""
    return 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def bubble_fraction(pp: int, micro_batches: int, chunks: int = 1) -> float:
    """Pipeline bubble relative to the ideal time: (p − 1)/(v·m) (Narayanan et al. 2021)."""
    return (pp - 1) / (chunks * micro_batches)


def mfu(model_flops: float, step_s: float, gpus: int, peak: float) -> float:
    """Model FLOPs utilisation: model FLOPs (no recompute) / (step time · GPUs · peak FLOP/s)."""
    return model_flops / (step_s * gpus * peak)


# ---- memory-bound traffic -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """Forward bytes of one layer's elementwise kernels per token, in units of the activation dtype's
    size e: c_h per hidden element (replicated across TP unless SP), c_i per MLP-width element,
    c_qkv per q/k/v element; c_scores per attention score (a·s per token) when scores are materialised,
    plus bytes that are not in the activation dtype (fp32 upcasts, 1-byte dropout masks) as extra_*."""

    c_h: float
    c_i: float
    c_qkv: float
    c_scores: float
    extra_h: float = 0.0  # bytes per hidden element
    extra_scores: float = 0.0  # bytes per score


# Megatron-LM (2021) fused kernels, per layer: 2 fused LayerNorms (read + write: 2 each), 2 fused
# bias-dropout-adds (read 2 inputs, write 1, plus a 1-byte mask), fused bias-GeLU over 4h (read + write);
# attention scores materialised: QKᵀ writes them, the fused scale-mask-softmax reads and writes them,
# dropout reads and writes them plus a 1-byte mask, attention·V reads them: 6e + 1 bytes per score.
# With e = 2 and I = 4h this is Korthikanti's count of 38 bytes per hidden element + 13 per score.
MEGATRON = Traffic(c_h=2 * 2 + 2 * 3, c_i=2, c_qkv=0, c_scores=6, extra_h=2 * 1, extra_scores=1)
# transformers, llama family, unfused (eager PyTorch ops): RMSNorm upcasts to fp32 (to fp32, pow,
# mean, rsqrt-mul, back to e, weight-mul: 4 passes in e + 28 fp32 bytes per element per norm, twice),
# two residual adds (read 2, write 1), SiLU(gate)·up over the MLP width (silu: 2, mul: 3), rotary on q
# and k and SDPA's reads of q, k, v and write of o (about 8 passes over the q/k/v width). Eager
# attention materialises the scores: QKᵀ write, fp32 softmax (read e, write 4, read 4, write e), AV read.
HF_LLAMA = Traffic(c_h=2 * 4 + 2 * 3, c_i=5, c_qkv=8, c_scores=4, extra_h=2 * 28, extra_scores=16)
# transformers GPT-2 / OPT: fused LayerNorm (2 passes) twice, residual adds, dropouts (2 passes +
# a 1-byte mask), gelu_new's eight elementwise ops over the MLP width, head split/merge copies.
HF_GPT = Traffic(c_h=2 * 2 + 2 * 3 + 2 * 2, c_i=16, c_qkv=4, c_scores=4, extra_h=2, extra_scores=16)


def traffic_for(spec: ModelSpec, style: Style) -> Traffic:
    if style == "megatron":
        return MEGATRON
    return HF_GPT if spec.model_type in ("gpt2", "opt") else HF_LLAMA


def layer_traffic_bytes(part: ModelSpec, seq: int, e: int, traffic: Traffic, *, tp: int = 1, sp: bool = False,
                        scores: bool = False) -> float:
    """Forward elementwise bytes of one layer per token on one rank (`part` is the rank's share)."""
    h = part.hidden_size
    inter = part.intermediate_size * (part.experts_per_token or 1)
    qkv = (part.num_attention_heads + 2 * part.num_key_value_heads) * part.head_dim
    hidden = (traffic.c_h * e + traffic.extra_h) * h / (tp if sp else 1)
    b = hidden + traffic.c_i * e * inter + traffic.c_qkv * e * qkv
    if scores:
        s = min(seq, part.sliding_window) if part.sliding_window else seq
        b += (traffic.c_scores * e + traffic.extra_scores) * part.num_attention_heads * s
    return b


def dequant_bytes(part: ModelSpec) -> float:
    """QLoRA: bitsandbytes dequantises each 4-bit weight on every use: read 0.5 B, write 2 B per element."""
    return sum(2.5 * lin.in_features * lin.out_features * lin.count for lin in part.layer_linears)


@dataclass(frozen=True)
class MicroBatchTime:
    """Seconds of one micro-batch on one rank, split by pass."""

    forward: float
    backward: float
    recompute: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def micro_batch_time(part: ModelSpec, tokens: int, seq: int, gpu: GPUSpec, *, dtype: str, method: str = "full",
                     grad_ckpt: bool = False, lora_rank: int = 0, lora_targets: list | None = None,
                     flash: bool = True, style: Style = "hf", tp: int = 1, sp: bool = False,
                     eff: Efficiency | None = None, causal: bool | None = None) -> MicroBatchTime:
    """Roofline time of one micro-batch through `part` on one rank (see the module doc). `flash`:
    SDPA (no scores materialised); `causal` (default: `flash`): the kernel skips causally masked
    pairs (False for eager attention and for a decode step over its context)."""
    eff = eff or efficiency(gpu)
    flop_rate = peak_flops(gpu, dtype) * eff.matmul * eff.software
    byte_rate = (gpu.mem_bandwidth_gb_per_s or 1000.0) * 1e9 * eff.memory * eff.software
    e = 4 if dtype == "fp32" else 2
    lin = linear_flops_per_token(part)
    ada = lora_flops_per_token(part, lora_rank, lora_targets or []) if method != "full" else 0.0
    att = attention_flops_per_token(part, seq, flash if causal is None else causal)
    traffic = layer_traffic_bytes(part, seq, e, traffic_for(part, style), tp=tp, sp=sp, scores=not flash)
    n = part.num_layers * tokens
    dq = dequant_bytes(part) * part.num_layers if method == "qlora" else 0.0
    fwd_layers = (lin + att + ada) * n / flop_rate + (traffic * n + dq) / byte_rate
    bwd_lin = 2 * lin if method == "full" else lin
    bwd_layers = (bwd_lin + 2 * att + 2 * ada) * n / flop_rate + (2 * traffic * n + dq) / byte_rate
    head = head_flops_per_token(part) * tokens / flop_rate if has_head(part) else 0.0
    head_bwd = head * (2 if method == "full" else 1)
    return MicroBatchTime(fwd_layers + head, bwd_layers + head_bwd, fwd_layers if grad_ckpt else 0.0)


def optimizer_step_time(trainable_elems: float, bytes_per_elem: float, gpu: GPUSpec,
                        eff: Efficiency | None = None) -> float:
    """The optimizer step is memory-bound: each trainable element's parameter, gradient and states are
    read and the parameter and states written (`bytes_per_elem` in all)."""
    eff = eff or efficiency(gpu)
    return trainable_elems * bytes_per_elem / ((gpu.mem_bandwidth_gb_per_s or 1000.0) * 1e9 * eff.memory * eff.software)
