"""Activation memory per rank under tensor, sequence and pipeline parallelism.

Two models:

1. "megatron" — Korthikanti et al. 2022 (arXiv:2205.05198), bytes per transformer layer for one
   micro-batch, fp16/bf16 activations (a = heads, s = seq, b = micro-batch, h = hidden, t = TP):
       no parallelism           sbh(34 + 5as/h)
       TP                       sbh(10 + 24/t + 5as/(ht))
       TP + SP                  sbh/t · (34 + 5as/h)
       TP + selective recompute sbh(10 + 24/t)          (the 5as/h attention-core term is recomputed)
       TP + SP + selective      34·sbh/t
       full recompute           2sbh (the layer input only; /t with SP, which stores it sequence-split)
   With 1F1B the first stage holds p micro-batches of its L/p layers = L layers' worth; the
   interleaved schedule multiplies that by 1 + (p−1)/(p·v), v = model chunks per stage (the paper's m,
   "number of interleaving stages", not the micro-batch count).

2. "engine" — our single-GPU engine's per-layer figures (the transformers program replayed op by op),
   scaled to one rank: `scale_single_gpu` for a single-GPU figure one already has, and
   estimate._activations, which replays the rank's own TP-split layer. Assumptions:
   - TP: a layer's activations split into a replicated part (the residual stream, norms, dropout
     masks, the inputs of the first column-parallel linears: hidden-sized per token) and a part inside
     the TP regions (heads, MLP width) that divides by t. The engine finds the split itself when it
     replays a layer with heads/t, KV heads/t and MLP width/t (shard.rank_spec).
   - SP: the replicated part is sequence-split too, so everything divides by t (as in Korthikanti),
     except the rotary cos/sin tables, which attention uses whole.
   - PP: a stage keeps (its layers) × (micro-batches in flight): 1F1B stage k holds min(p − k, m)
     micro-batches; the interleaved schedule's stage k holds min(m·v, 2(p−k−1) + (v−1)p + 1)
     chunk-micro-batches of L/(p·v) layers each (Megatron's warm-up count + the one running), which
     for stage 0 is Korthikanti's L·(1 + (p−1)/(p·v)).
   - Gradient checkpointing keeps each layer's input (replicated across TP unless SP) and re-runs
     one layer at a time in backward: one layer's full (TP-split) activations are the transient.
"""

from __future__ import annotations

from typing import Literal

Recompute = Literal["none", "selective", "full"]


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                            recompute: Recompute = "none") -> float:
    """Activation bytes one transformer layer keeps for backward (Korthikanti et al., Table 2)."""
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)  # the layer input
    core = 0.0 if recompute == "selective" else 5 * a * s / h  # softmax, its dropout mask, attention over values
    if sp:
        return sbh / t * (34 + core)
    return sbh * (10 + 24 / t + core / t)


def in_flight(pp: int, stage: int, micro_batches: int, chunks: int = 1) -> float:
    """Micro-batches whose activations stage `stage` holds at its peak, in units of the stage's
    full layer count: 1F1B min(p − k, m); interleaved min(m·v, 2(p−k−1) + (v−1)p + 1) chunks / v."""
    if chunks == 1:
        return float(min(pp - stage, micro_batches))
    warm = 2 * (pp - stage - 1) + (chunks - 1) * pp + 1
    return min(micro_batches * chunks, warm) / chunks


def interleave_factor(pp: int, chunks: int) -> float:
    """Korthikanti's first-stage factor for the interleaved schedule: 1 + (p − 1)/(p·v)."""
    return 1 + (pp - 1) / (pp * chunks)


def korthikanti_stage_bytes(s: int, b: int, h: int, a: int, layers: int, t: int = 1, sp: bool = False,
                            recompute: Recompute = "none", pp: int = 1, stage: int = 0, micro_batches: int = 1,
                            chunks: int = 1) -> float:
    """Activations a pipeline stage keeps for its layers: per-layer bytes × L/p × micro-batches in flight."""
    per_layer = korthikanti_layer_bytes(s, b, h, a, t, sp, recompute)
    return per_layer * layers / pp * in_flight(pp, stage, micro_batches, chunks)


def korthikanti_output_bytes(s: int, b: int, h: int, vocab: int, t: int = 1) -> float:
    """Last stage's output layer (Korthikanti §4.3): final norm input and lm_head input 4sbh/t,
    plus the fp32 logits the cross-entropy keeps 4sbv/t."""
    return 4 * s * b * h / t * (1 + vocab / h)


def scale_single_gpu(layer_bytes: float, num_layers: int, *, tp: int = 1, sp: bool = False,
                     replicated_fraction: float, pp: int = 1, stage: int = 0, micro_batches: int = 1,
                     chunks: int = 1, stage_layers: int | None = None) -> float:
    """One rank's share of a single-GPU activation figure.

    layer_bytes: what ALL decoder layers keep for one micro-batch on one GPU (no parallelism).
    replicated_fraction: the part of it outside the TP regions (Korthikanti's no-recompute figure:
      10/(34 + 5as/h); with flash attention (no s² term) 10/34; with full recompute 1.0).
    Returns: per-rank bytes = layer_bytes/L × stage layers × in-flight micro-batches ×
      (with SP) 1/t, (TP only) replicated + (1 − replicated)/t.
    """
    per_layer = layer_bytes / num_layers
    if sp:
        per_layer /= tp
    else:
        per_layer *= replicated_fraction + (1 - replicated_fraction) / tp
    layers = stage_layers if stage_layers is not None else num_layers / pp
    return per_layer * layers * in_flight(pp, stage, micro_batches, chunks)
