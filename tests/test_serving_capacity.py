"""KV-cache capacity: the per-token formula against real caches, the vLLM budget, tensor parallelism."""

from __future__ import annotations

import pytest

from planner.models import load_model, model_ids
from planner.serving.capacity import (
    GiB,
    KV_DTYPE_BYTES,
    SAMPLER_BYTES_PER_LOGIT,
    activation_peak,
    capacity,
    kv_bytes_per_token,
    resolve,
    weight_bytes,
)
from planner.serving.specs import ServeInputError, ServeSpec


def cap_of(tokens_per_seq: int = 1280, **kw):
    setup = resolve(ServeSpec(**kw))
    return setup, capacity(setup, tokens_per_seq)


# ---- KV bytes per token -------------------------------------------------------------------------
@pytest.mark.parametrize("model_id", model_ids())
def test_kv_per_token_is_the_formula_and_matches_the_engine(model_id):
    from planner.engine.generation import kv_bytes_per_token as engine_kv

    spec = load_model(model_id)
    for dtype in ("bf16", "fp32"):
        want = 2 * spec.num_layers * spec.num_key_value_heads * spec.head_dim * KV_DTYPE_BYTES[dtype]
        assert kv_bytes_per_token(spec, dtype) == want == engine_kv(spec, dtype)
    assert kv_bytes_per_token(spec, "fp8") * 2 == kv_bytes_per_token(spec, "bf16")


def test_opt_13b_is_800_kib_per_token_as_in_the_vllm_paper():
    spec = load_model("opt-13b")  # computed from the catalog's config, not a copied figure
    assert kv_bytes_per_token(spec, "bf16") == 800 * 1024
    # "1.6 GB for a 2048-token request"
    assert kv_bytes_per_token(spec, "bf16") * 2048 / 2**30 == pytest.approx(1.5625)


def _tiny(kv_heads: int, **extra):
    base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 128, "torch_dtype": "float32"}  # fmt: skip
    base.update(extra)
    return base


@pytest.mark.parametrize("name,cfg", [
    ("MHA", _tiny(4)),
    ("GQA", _tiny(2)),
    ("MQA", _tiny(1)),
    ("GQA head_dim 16", _tiny(2, head_dim=16)),
])  # fmt: skip
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kv_per_token_equals_a_real_dynamic_cache(name, cfg, dtype):
    torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    from planner.architecture import spec_from_config

    spec = spec_from_config(cfg, id=name)
    conf = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = transformers.LlamaForCausalLM(conf).to(tdt).eval()
    tokens = 11
    with torch.no_grad():
        out = model(torch.randint(0, 64, (2, tokens)), use_cache=True)
    cache = out.past_key_values
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)  # fmt: skip
    assert held == 2 * tokens * kv_bytes_per_token(spec, dtype)


def test_sliding_window_layers_hold_at_most_the_window_in_a_real_cache():
    """Mistral-style sliding window on every layer: transformers keeps window - 1 tokens between steps
    (vLLM holds the window during a step); the per-token bytes per layer are the same formula."""
    torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    from planner.architecture import spec_from_config

    cfg = _tiny(2, model_type="mistral", sliding_window=8)
    spec = spec_from_config(cfg, id="tiny-mistral")
    assert spec.sliding_window == 8
    conf = transformers.MistralConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    model = transformers.MistralForCausalLM(conf).eval()
    tokens = 20
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, tokens)), use_cache=True)
    held = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in out.past_key_values.layers)
    assert held == min(tokens, 8 - 1) * kv_bytes_per_token(spec, "fp32")


def test_sliding_window_caps_the_blocks_a_sequence_holds():
    setup, rep = cap_of(model="gemma-2-9b", gpu="a100-80gb", tokens_per_seq=8192)
    assert (setup.full_layers, setup.sliding_layers, setup.window) == (21, 21, 4096)
    bs = setup.block_size
    assert setup.layer_blocks(8192) == 21 * 8192 // bs + 21 * 4096 // bs
    assert setup.layer_blocks(100) == 42 * -(-100 // bs)
    # a long sequence takes fewer blocks than if every layer were global
    assert rep.kv_cache.max_concurrency_at_max_model_len > rep.kv_cache.blocks / (8192 / bs)


# ---- the vLLM budget ----------------------------------------------------------------------------
def test_budget_is_total_times_utilisation_minus_weights_activation_and_non_torch():
    setup, rep = cap_of(model="llama-3.1-8b", gpu="h100-sxm", max_model_len=16000)
    m = rep.memory
    assert m.requested == int(m.total * 0.9)
    assert m.kv_budget == m.requested - m.weights - m.activation_peak - m.non_torch
    per_rank = kv_bytes_per_token(setup.model, "bf16")
    assert rep.kv_cache.blocks == m.kv_budget // (16 * per_rank)
    assert rep.kv_cache.tokens == rep.kv_cache.blocks * 16
    assert rep.kv_cache.max_concurrent_sequences == rep.kv_cache.blocks // (1280 // 16)
    assert (setup.max_num_batched_tokens, setup.max_num_seqs) == (8192, 1024)  # vllm serve on an H100
    # vLLM's start-up log for this model and card (H100, 0.9, max_model_len 16000): weights 14.99 GiB,
    # peak activation 4.76 GiB, non-torch 0.13 GiB, KV cache 51.38 GiB
    assert m.weights / GiB == pytest.approx(14.99, abs=0.006)
    assert m.activation_peak / GiB == pytest.approx(4.76, abs=0.02)
    assert m.kv_budget / GiB == pytest.approx(51.38, abs=0.03)


def test_activation_peak_is_the_sampler_over_max_num_seqs_rows():
    setup, _ = cap_of(model="qwen2.5-0.5b", gpu="h100-sxm")
    peak, fwd, sampler = activation_peak(setup)
    assert sampler == int(1024 * setup.model.vocab_size * SAMPLER_BYTES_PER_LOGIT + 8192 * setup.model.hidden_size * 2)
    assert peak == max(fwd, sampler)
    small, _ = cap_of(model="qwen2.5-0.5b", gpu="a100-80gb")  # A100: 256 sequences, 2048 tokens
    assert (small.max_num_seqs, small.max_num_batched_tokens) == (256, 2048)
    assert activation_peak(small)[0] < peak


def test_weights_by_dtype_and_tensor_parallel_shares():
    bf16, _ = cap_of(model="llama-3.1-70b", gpu="h100-sxm")
    fp8, _ = cap_of(model="llama-3.1-70b", gpu="h100-sxm", weights_dtype="fp8")
    nf4, _ = cap_of(model="llama-3.1-70b", gpu="h100-sxm", weights_dtype="nf4")
    w = {k: weight_bytes(s).total for k, s in (("bf16", bf16), ("fp8", fp8), ("nf4", nf4))}
    assert w["nf4"] < w["fp8"] < w["bf16"]
    assert w["bf16"] == pytest.approx(2 * bf16.model.num_params + 131072 * 128 * 2, rel=1e-9)
    # vLLM's log for Llama-3.3-70B FP8 with TP=2: 33.88 GiB per rank
    fp8_tp2, rep = cap_of(model="llama-3.1-70b", gpu="h100-sxm", weights_dtype="fp8", tp=2, max_model_len=16000)
    assert weight_bytes(fp8_tp2).total / GiB == pytest.approx(33.88, abs=0.01)
    assert rep.kv_cache.bytes_per_token_per_rank * 2 == rep.kv_cache.bytes_per_token
    assert rep.memory.non_torch > cap_of(model="llama-3.1-8b", gpu="h100-sxm")[1].memory.non_torch


def test_tp_splits_kv_heads_or_replicates_them_and_rejects_the_rest():
    s8, r8 = cap_of(model="llama-3.1-70b", gpu="h100-sxm", tp=8)
    assert (s8.kv_heads_per_rank, s8.kv_heads_replicated) == (1, False)
    assert r8.kv_cache.bytes_per_token_per_rank * 8 == r8.kv_cache.bytes_per_token
    s16, r16 = cap_of(model="llama-3.1-405b", gpu="h100-sxm", tp=16)
    assert (s16.kv_heads_per_rank, s16.kv_heads_replicated) == (1, True)
    assert any("replica" in w for w in r16.warnings)
    with pytest.raises(ServeInputError, match="tp: 3 does not divide the 32 attention heads"):
        resolve(ServeSpec(model="llama-3.1-8b", gpu="h100-sxm", tp=3))


def test_kv_dtype_defaults_to_the_serving_dtype():
    s, r = cap_of(model="opt-13b", gpu="a100-80gb")
    assert s.kv_dtype == "fp16" and r.kv_cache.bytes_per_token == 800 * 1024
    s, r = cap_of(model="gpt2", gpu="a100-80gb", max_model_len=1024)  # fp32 config: served in 16 bits
    assert s.serving_dtype == "bf16" and s.kv_dtype == "bf16"
    s, _ = cap_of(model="llama-3.1-8b", gpu="t4", max_model_len=4096, weights_dtype="nf4")  # no bf16 on a T4
    assert s.serving_dtype == "fp16"
    s, r = cap_of(model="llama-3.1-8b", gpu="h100-sxm", kv_dtype="fp8")
    assert r.kv_cache.bytes_per_token == 64 * 1024


# ---- does not fit / bad input -------------------------------------------------------------------
def test_weights_larger_than_the_card_do_not_fit():
    _, rep = cap_of(model="llama-3.1-405b", gpu="h100-sxm")
    assert not rep.fits and "weights alone" in rep.reason
    assert rep.kv_cache.blocks == 0


def test_no_room_for_kv_cache_or_for_max_model_len_do_not_fit():
    _, rep = cap_of(model="llama-3.1-70b", gpu="h100-sxm", weights_dtype="fp8", max_model_len=16000)
    assert not rep.fits and "no memory for the KV cache" in rep.reason  # vLLM's log: -1.44 GiB
    _, rep = cap_of(model="llama-3.1-8b", gpu="a10g", weights_dtype="fp8")
    assert not rep.fits and "estimated maximum model length" in rep.reason
    _, rep = cap_of(model="llama-3.1-8b", gpu="h100-sxm", gpu_memory_utilization=1.0)
    assert not rep.fits and "CUDA context" in rep.reason


def test_max_model_len_beyond_the_context_is_bad_input():
    with pytest.raises(ServeInputError, match="max-model-len: 200000 is beyond llama-3.1-8b's context of 131072"):
        resolve(ServeSpec(model="llama-3.1-8b", gpu="h100-sxm", max_model_len=200000))


def test_token_budget_below_sequence_limit_is_bad_input():
    with pytest.raises(ServeInputError, match="max-num-batched-tokens"):
        resolve(ServeSpec(model="llama-3.1-8b", gpu="h100-sxm", max_num_seqs=512, max_num_batched_tokens=256))


def test_validation_table_against_vllm_logs():
    from planner.serving.validation import rows

    for r in rows():
        assert r["weights"] == pytest.approx(r["weights_log"], abs=0.01), r["name"]
        assert r["non_torch"] == pytest.approx(r["non_torch_log"], abs=0.011), r["name"]
        assert r["kv"] == pytest.approx(r["kv_log"], abs=0.05), r["name"]
        assert r["fits"] == r["fits_log"], r["name"]
