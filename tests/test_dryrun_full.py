"""Full-size dry runs (fake tensors): published configs, written inline. Tens of seconds each.

Run with `pytest -m slow tests/test_dryrun_full.py`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("peft", reason="peft is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")

from planner.backends.dryrun import dry_run  # noqa: E402
from planner.specs import Plan  # noqa: E402

pytestmark = pytest.mark.slow
GiB = 2**30

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def _run(cfg, **kw):
    return dry_run(Plan(model="test", **kw), cfg)


def test_llama31_8b_bf16_full():
    r = _run(LLAMA_31_8B, batch=1, seq=2048)
    n = r.params["params"]
    assert n == 8_030_261_248
    assert r.breakdown["parameters"] >= 2 * n
    # foreach AdamW: bf16 params + grads + 2 states + one parameter-sized _foreach_sqrt temporary
    assert r.peak_phase == "optimizer"
    assert 10 * n <= r.peak_allocated_bytes <= 10 * n + 2 * GiB
    assert r.breakdown["optimizer_states"] == pytest.approx(4 * n, rel=1e-3)
    assert r.details["optimizer_temporaries"] == pytest.approx(2 * n, rel=1e-3)
    assert len(set(r.step_end_bytes)) == 1
    assert r.wall_s < 60


def test_llama31_8b_bf16_batch4_checkpointing_peak_in_loss_backward():
    r = _run(LLAMA_31_8B, batch=4, seq=2048, grad_ckpt=True)
    tokens, V = 4 * 2048, 128256
    assert r.peak_phase in ("backward", "optimizer")
    # step 2's log-softmax backward: bf16 logits (held by `out`) + fp32 log-softmax + two fp32 grads
    if r.peak_phase == "backward":
        assert r.details["logits_fp32"] == 3 * tokens * V * 4


def test_llama31_8b_lora_and_qlora_with_checkpointing():
    lora = _run(LLAMA_31_8B, batch=4, seq=2048, method="lora", grad_ckpt=True)
    qlora = _run(LLAMA_31_8B, batch=4, seq=2048, method="qlora", grad_ckpt=True)
    assert lora.params["trainable_params"] == qlora.params["trainable_params"] == 41_943_040
    # adapters fp32, AdamW states fp32: 8 bytes per trainable parameter
    assert lora.breakdown["optimizer_states"] == pytest.approx(8 * 41_943_040, rel=1e-3)
    assert 0.09 * GiB < qlora.details["quant_state"] < 0.12 * GiB
    assert qlora.breakdown["parameters"] < lora.breakdown["parameters"]
    assert len(set(lora.step_end_bytes)) == 1 and len(set(qlora.step_end_bytes)) == 1


def test_llama31_8b_generate_kv_cache():
    B, P, N = 8, 512, 128
    r = _run(LLAMA_31_8B, task="generate", batch=B, prompt_len=P, new_tokens=N)
    per_token = 2 * 32 * 8 * 128 * 2  # K and V, layers, kv heads, head_dim, bf16
    assert r.peak_phase in ("prefill", "decode")
    if r.peak_phase == "prefill":
        assert r.breakdown["kv_cache"] == B * P * per_token
    assert r.breakdown["parameters"] == 2 * 8_030_261_248
    assert r.wall_s < 120


def test_qwen25_7b_bf16_full():
    r = _run(QWEN25_7B, batch=1, seq=2048)
    n = r.params["params"]
    assert n == 7_615_616_512
    assert 10 * n <= r.peak_allocated_bytes <= 10 * n + 3 * GiB


def test_llama32_1b_tied_embeddings_and_8bit_optimizers():
    adam = _run(LLAMA_32_1B, batch=1, seq=512)
    eight = _run(LLAMA_32_1B, batch=1, seq=512, optimizer="adamw-8bit")
    paged = _run(LLAMA_32_1B, batch=1, seq=512, optimizer="paged-adamw-8bit")
    n = adam.params["params"]
    assert n == 1_235_814_400  # lm_head tied to the embedding
    assert eight.breakdown["optimizer_states"] == pytest.approx(2 * n, rel=0.02)
    assert paged.details["paged_optimizer_states"] == pytest.approx(2 * n, rel=0.02)
    assert paged.breakdown["optimizer_states"] < 0.05 * eight.breakdown["optimizer_states"]
