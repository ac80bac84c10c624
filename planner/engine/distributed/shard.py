"""What one rank holds of a model under tensor and pipeline parallelism, as a smaller ModelSpec.

Tensor parallelism follows Megatron-LM (and torch's `parallelize_module` with Colwise/Rowwise plans):
- column-parallel linears (q, k, v, gate, up, fc1, GPT-2 c_attn/c_fc): out_features / t, bias split;
- row-parallel linears (o, down, fc2, GPT-2 c_proj): in_features / t, bias replicated
  (added once after the all-reduce);
- attention heads, KV heads and the MLP width / t; MoE expert tensors / t, router replicated;
- norms replicated; word embeddings and lm_head vocab-parallel: ceil(V/t) rows
  (Megatron pads the vocabulary to a multiple of 128*t; ceil is the unpadded lower bound);
- learned position embeddings replicated.
Pipeline parallelism: stage k holds its layers (L/p each; with L % p != 0 the first stages take one
more), the embeddings on the first stage, the final norm and lm_head on the last. A tied lm_head with
pp > 1 becomes a copy of the embedding on the last stage (Megatron keeps both and all-reduces their
gradients), so it counts on both stages.

`rank_spec` returns that share as a ModelSpec, so the single-GPU engine's `resident()` and
`optimizer_memory()` and its layer recipes apply to one rank unchanged.
"""

from __future__ import annotations

from planner.architecture import LinearSpec, ModelSpec

# Linears whose input is the TP-split dimension (Megatron RowParallelLinear); all others are
# column-parallel. GPT-2 names both output projections c_proj.
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "c_proj", "out_proj", "fc2", "dense", "dense_4h_to_h", "w2"})


def is_row_parallel(lin: LinearSpec) -> bool:
    return lin.name in ROW_PARALLEL


def stage_layers(num_layers: int, pp: int, stage: int) -> int:
    """Decoder layers on pipeline stage `stage` (0-based): L // p, the first L % p stages one more."""
    base, extra = divmod(num_layers, pp)
    return base + (1 if stage < extra else 0)


def split_linear(lin: LinearSpec, t: int) -> LinearSpec:
    if t == 1:
        return lin
    if is_row_parallel(lin):
        return lin.model_copy(update={"in_features": lin.in_features // t})
    return lin.model_copy(update={"out_features": lin.out_features // t})


_cache: dict[tuple, tuple[ModelSpec, ModelSpec]] = {}


def rank_spec(spec: ModelSpec, tp: int = 1, pp: int = 1, stage: int = 0) -> ModelSpec:
    """The part of `spec` one rank of pipeline stage `stage` holds with TP degree `tp` (cached: specs
    are frozen; the cache keeps the spec it was built from, so an id is never reused wrongly)."""
    if tp == 1 and pp == 1:
        return spec
    key = (id(spec), tp, pp, stage)
    hit = _cache.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    part = _rank_spec(spec, tp, pp, stage)
    if len(_cache) > 4096:
        _cache.clear()
    _cache[key] = (spec, part)
    return part


def _rank_spec(spec: ModelSpec, tp: int, pp: int, stage: int) -> ModelSpec:
    t = tp
    first, last = stage == 0, stage == pp - 1
    vocab = -(-spec.vocab_size // t)
    h = spec.hidden_size
    norms = spec.layer_norm_params
    other = norms + spec.layer_expert_params // t + spec.layer_router_params
    tied_copy = spec.tie_word_embeddings and pp > 1
    head = 0
    if last:
        if spec.lm_head_params or tied_copy:
            head = vocab * h
    return spec.model_copy(update={
        "id": f"{spec.id}[tp{t} pp{pp} stage{stage}]",
        "num_layers": stage_layers(spec.num_layers, pp, stage),
        "num_attention_heads": spec.num_attention_heads // t,
        "num_key_value_heads": max(1, spec.num_key_value_heads // t),
        "intermediate_size": spec.intermediate_size // t,
        "vocab_size": vocab,
        "layer_linears": [split_linear(lin, t) for lin in spec.layer_linears],
        "layer_other_params": other,
        "layer_expert_params": spec.layer_expert_params // t,
        "embedding_params": vocab * h if first else 0,
        "position_embedding_params": spec.position_embedding_params if first else 0,
        "extra_params": spec.extra_params if first else 0,
        "final_norm_params": spec.final_norm_params if last else 0,
        "lm_head_params": head,
        "tie_word_embeddings": spec.tie_word_embeddings and pp == 1,
    })


def busiest_stages(pp: int) -> tuple[int, ...]:
    """The stages that can hold the most: the first (embeddings, most micro-batches in flight)
    and the last (lm_head, logits). Middle stages hold no more than the first."""
    return (0,) if pp == 1 else (0, pp - 1)
