"""Dry runs on tiny configs: fake tensors must account exactly like real ones, and the figures
must obey what the programs are known to allocate. Seconds each."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("peft", reason="peft is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")

from planner.backends.dryrun import dry_run  # noqa: E402
from planner.result import CATEGORIES  # noqa: E402
from planner.specs import Plan  # noqa: E402

LLAMA = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
QWEN2 = {
    "model_type": "qwen2",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2}


def _plan(**kw) -> Plan:
    base = {"model": "tiny", "batch": 2, "seq": 32}
    if kw.get("task") == "generate":
        base = {"model": "tiny", "batch": 2}
    base.update(kw)
    return Plan(**base)


def _same(a, b) -> None:
    assert a.peak_allocated_bytes == b.peak_allocated_bytes
    assert a.breakdown == b.breakdown
    assert a.details == b.details
    assert a.phases == b.phases
    assert a.peak_phase == b.peak_phase and a.peak_step == b.peak_step
    assert a.step_end_bytes == b.step_end_bytes


PLANS = {
    "full-bf16": {},
    "mixed-bf16-ckpt": {"precision": "mixed-bf16", "grad_ckpt": True},
    "fp32": {"precision": "fp32"},
    "eager": {"attn": "eager"},
    "lora": {"method": "lora", "lora_rank": 4},
    "lora-ckpt": {"method": "lora", "lora_rank": 4, "grad_ckpt": True},
    "qlora": {"method": "qlora", "lora_rank": 4},
    "qlora-ckpt": {"method": "qlora", "lora_rank": 4, "grad_ckpt": True},
    "generate": {"task": "generate", "prompt_len": 16, "new_tokens": 4},
    "generate-qlora": {"task": "generate", "method": "qlora", "lora_rank": 4, "prompt_len": 16, "new_tokens": 5},
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(PLANS))
def test_fake_equals_real(arch, name):
    """The same program on fake and on real CPU tensors gives identical accounting. (QLoRA: the
    packed weights and quantization states are real never-written tensors in both; the 4-bit
    matmul is the CUDA dispatch's allocation pattern, see _patches.bnb_cuda_gemm.)"""
    if "qlora" in name:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    plan = _plan(**PLANS[name])
    fake = dry_run(plan, CONFIGS[arch], device="fake")
    real = dry_run(plan, CONFIGS[arch], device="cpu")
    _same(fake, real)
    assert sum(fake.breakdown.values()) == fake.peak_allocated_bytes
    assert set(fake.breakdown) == set(CATEGORIES)


def test_full_bf16_adamw_accounting():
    plan = _plan()
    r = dry_run(plan, LLAMA, round_bytes=1)
    n = r.params["params"]
    assert r.params["param_bytes"] == 2 * n
    # model built before the measured program: exactly its parameter bytes
    assert r.breakdown["parameters"] == 2 * n
    assert r.baseline_bytes == 2 * n + r.breakdown["buffers"]
    # bf16 params + bf16 grads + two bf16 AdamW states
    assert r.peak_allocated_bytes >= 8 * n
    # after a step: params + states; the step's `out` (logits, loss) and `ids` went with it
    assert r.step_end_bytes[-1] == 2 * n + r.breakdown["buffers"] + 4 * n
    # no leak: memory after each step is flat
    assert len(set(r.step_end_bytes)) == 1
    assert r.peak_phase in ("backward", "optimizer")
    assert set(r.phases) == {"forward", "loss", "backward", "optimizer"}


def test_foreach_adamw_temporary_and_optimizer_phase():
    """With batch*seq*vocab small, the peak is foreach AdamW's parameter-sized sqrt temporary."""
    plan = _plan(batch=1, seq=4)
    r = dry_run(plan, LLAMA, round_bytes=1)
    n = r.params["params"]
    assert r.peak_phase == "optimizer"
    assert r.breakdown["optimizer_states"] == 4 * n  # two bf16 states
    assert r.breakdown["gradients"] == 2 * n
    assert r.details["optimizer_temporaries"] >= 2 * n  # _foreach_sqrt(exp_avg_sq)
    assert "_foreach" in r.peak_op


def test_mixed_precision_weight_cast_cache():
    """Under autocast, bf16 copies of the fp32 weights are cached for the whole forward: at the
    end of the loss, every Linear weight (incl. lm_head) has its bf16 copy alive."""
    plan = _plan(precision="mixed-bf16", batch=4, seq=64)
    r = dry_run(plan, LLAMA, round_bytes=1)
    n = r.params["params"]
    assert r.params["param_bytes"] == 4 * n
    assert r.breakdown["parameters"] == 4 * n
    assert r.breakdown["gradients"] in (0, 4 * n) or r.peak_phase == "backward"


def test_lora_trainable_and_states():
    plan = _plan(method="lora", lora_rank=4)
    r = dry_run(plan, LLAMA, round_bytes=1)
    t = r.params["trainable_params"]
    L, H, I, kv_dim = 2, 64, 128, 32  # noqa: E741
    per_layer = 4 * ((H + H) + (H + kv_dim) * 2 + (H + H)) + 4 * ((H + I) * 2 + (I + H))
    assert t == L * per_layer
    assert r.params["trainable_param_bytes"] == 4 * t  # adapters stay fp32
    assert r.breakdown["optimizer_states"] == 8 * t or r.peak_step == 0
    assert len(set(r.step_end_bytes[1:])) == 1


def test_lora_ckpt_no_embedding_leak():
    """measuring.md item 3: with enable_input_require_grads + checkpointing the module tracker
    must not keep the embedding output alive from one step to the next."""
    r = dry_run(_plan(method="lora", lora_rank=4, grad_ckpt=True), LLAMA, steps=4)
    assert len(set(r.step_end_bytes)) == 1


def test_qlora_quant_state_and_packed_weights():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    r = dry_run(_plan(method="qlora", lora_rank=4), LLAMA, round_bytes=1)
    H, I, kv_dim, L = 64, 128, 32, 2  # noqa: E741
    lin = [(H, H), (kv_dim, H), (kv_dim, H), (H, H), (I, H), (I, H), (H, I)]
    n4 = L * sum(o * i for o, i in lin)
    packed = L * sum((o * i + 1) // 2 for o, i in lin)
    # nested (double) quantization: uint8 absmax per 64, fp32 codes, offset, fp32 absmax per 256 blocks
    qs = 0
    for o, i in lin:
        blocks = -(-(o * i) // 64)
        qs += blocks + 16 * 4 + 4 + 4 * -(-blocks // 256) + 256 * 4
    assert r.details["quant_state"] == L * qs
    assert r.breakdown["other"] == L * qs
    # non-quantized parameters (embeddings, norms, lm_head) are fp32 after
    # prepare_model_for_kbit_training; adapters are fp32; packed weights are uint8
    assert n4 == 2 * packed
    others = r.params["params"] - packed - r.params["trainable_params"]
    assert r.breakdown["parameters"] == packed + 4 * (others + r.params["trainable_params"])
    assert len(set(r.step_end_bytes[1:])) == 1


def test_qlora_single_quant():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    r = dry_run(_plan(method="qlora", lora_rank=4, double_quant=False, quant="fp4"), LLAMA, round_bytes=1)
    H, I, kv_dim, L = 64, 128, 32, 2  # noqa: E741
    lin = [(H, H), (kv_dim, H), (kv_dim, H), (H, H), (I, H), (I, H), (H, I)]
    qs = L * sum(4 * -(-(o * i) // 64) + 16 * 4 for o, i in lin)
    assert r.details["quant_state"] == qs


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_generate_kv_cache(arch):
    cfg = CONFIGS[arch]
    B, P = 2, 16
    r = dry_run(_plan(task="generate", batch=B, prompt_len=P, new_tokens=1), cfg, round_bytes=1)
    L, kv, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    assert r.peak_phase == "prefill"
    assert r.breakdown["kv_cache"] == 2 * L * B * P * kv * hd * 2
    assert r.breakdown["kv_cache"] == r.details["kv_cache"]
    assert r.breakdown["gradients"] == 0 and r.breakdown["optimizer_states"] == 0


def test_generate_decode_phase_and_growth():
    B, P, N = 2, 16, 6
    r = dry_run(_plan(task="generate", batch=B, prompt_len=P, new_tokens=N), LLAMA, round_bytes=1)
    assert set(r.phases) == {"prefill", "decode"}
    S = P + r.peak_step if r.peak_phase == "decode" else P
    # the cache at the peak holds S positions (plus, inside a layer's cat, one transient copy)
    per_pos = 2 * 2 * B * 2 * 16 * 2
    assert r.breakdown["kv_cache"] >= S * per_pos
    assert r.breakdown["kv_cache"] <= (S + 1) * per_pos + 2 * B * 2 * S * 16 * 2


@pytest.mark.parametrize("opt", ["sgd", "adamw-fused", "adamw-8bit", "paged-adamw-8bit"])
def test_other_optimizers_fake_equals_real(opt):
    plan = _plan(optimizer=opt)
    _same(dry_run(plan, LLAMA), dry_run(plan, LLAMA, device="cpu"))


def test_optimizer_states():
    n_by_opt = {}
    for opt in ("adamw", "adamw-fused", "sgd", "adamw-8bit", "paged-adamw-8bit"):
        r = dry_run(_plan(optimizer=opt, batch=1, seq=4), LLAMA, round_bytes=1)
        n_by_opt[opt] = r
    n = n_by_opt["adamw"].params["params"]
    fused = n_by_opt["adamw-fused"]
    # fused AdamW: states + a fp32 step scalar per parameter on the device, no temporaries
    assert fused.step_end_bytes[-1] - n_by_opt["adamw"].step_end_bytes[-1] == 4 * len(_param_shapes(LLAMA))
    assert n_by_opt["sgd"].step_end_bytes[-1] == n_by_opt["adamw"].step_end_bytes[-1] - 4 * n
    # 8-bit: uint8 states + fp32 absmax per 256 for tensors >= 4096 elements, fp32 states otherwise
    expect = 0
    for shape in _param_shapes(LLAMA):
        numel = 1
        for s in shape:
            numel *= s
        expect += 2 * numel + 2 * 4 * -(-numel // 256) if numel >= 4096 else 2 * 4 * numel
    expect += 2 * 256 * 4  # the two shared quantization maps
    eight = n_by_opt["adamw-8bit"]
    # (the step's logits, loss and ids went when it ended)
    assert eight.step_end_bytes[-1] - eight.baseline_bytes == expect
    paged = n_by_opt["paged-adamw-8bit"]
    # paged buffers (tensors >= 1e5 elements) are outside the allocator: reported apart
    big = sum(_numel(s) for s in _param_shapes(LLAMA) if _numel(s) >= 1e5)
    assert paged.details.get("paged_optimizer_states", 0) == 2 * big
    assert paged.step_end_bytes[-1] == eight.step_end_bytes[-1] - 2 * big


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _param_shapes(cfg) -> list[tuple[int, ...]]:
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]  # noqa: E741
    kv = cfg["num_key_value_heads"] * H // cfg["num_attention_heads"]
    layer = [(H, H), (kv, H), (kv, H), (H, H), (I, H), (I, H), (H, I), (H,), (H,)]
    out = [(V, H)] + layer * L + [(H,)]
    if not cfg.get("tie_word_embeddings"):
        out.append((V, H))
    return out


def test_cuda_autocast_policy_covers_cuda_only_ops():
    from planner.backends.dryrun import _patches

    missing = set(_patches.cuda_only_autocast_ops()) - _patches._policy_names()
    assert not missing, f"ops CUDA autocasts but the replay does not: {sorted(missing)}"


def test_cuda_autocast_policy_effect():
    from planner.backends.dryrun import _patches

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert x.pow(2).dtype == torch.bfloat16  # CPU's own policy
        with _patches.cuda_autocast_policy():
            assert x.pow(2).dtype == torch.float32
            assert torch.rsqrt(x.abs() + 1).dtype == torch.float32
            assert torch.softmax(x, -1).dtype == torch.float32
            assert x.sum().dtype == torch.float32
            assert torch.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16  # explicit dtype kept
            assert torch.log_softmax(x, -1).dtype == torch.float32
            assert x.cumsum(0, dtype=torch.bfloat16).dtype == torch.bfloat16
            assert x.long().sum().dtype == torch.int64  # not eligible
            assert torch.einsum("ij,kj->ik", x.float(), x.float()).dtype == torch.bfloat16
            assert torch.nn.functional.linear(x.float(), x.float()).dtype == torch.bfloat16
        assert x.pow(2).dtype == torch.bfloat16  # restored


def test_autocast_query_means_cpu():
    from planner.backends.dryrun import _patches

    with _patches.autocast_query_means_cpu():
        assert not torch.is_autocast_enabled()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled()
            assert not torch.is_autocast_enabled("cuda")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.is_autocast_enabled()


def test_result_is_json_and_lazy_import():
    import subprocess
    import sys

    code = "import sys, planner.backends.dryrun; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    r = dry_run(_plan(batch=1, seq=8), LLAMA)
    assert r.model_dump_json()
    assert r.versions["torch"].startswith("2.")


@pytest.mark.parametrize("device", ["fake", "cpu"])
def test_generate_shortcut_is_exact(device):
    """Skipping the model in the middle decode steps (only growing the cache) changes nothing."""
    from planner.backends.dryrun._run import dry_run_impl

    plan = _plan(task="generate", batch=2, prompt_len=16, new_tokens=7)
    # exact bytes: with 512-byte rounding two consecutive steps can tie, and the shortcut then
    # reports the later one as the peak step (same bytes, same breakdown)
    short = dry_run_impl(plan, LLAMA, device=device, round_bytes=1)
    full = dry_run_impl(plan, LLAMA, device=device, round_bytes=1, full_decode=True)
    _same(short, full)
    assert short.peak_phase == "decode" and short.peak_step == 6
    short = dry_run_impl(plan, LLAMA, device=device)
    full = dry_run_impl(plan, LLAMA, device=device, full_decode=True)
    assert (short.peak_allocated_bytes, short.breakdown, short.details, short.phases) == (
        full.peak_allocated_bytes,
        full.breakdown,
        full.details,
        full.phases,
    )


def test_grad_accumulation_keeps_gradients_between_micro_batches():
    one = dry_run(_plan(method="lora", lora_rank=4), LLAMA, round_bytes=1)
    two = dry_run(_plan(method="lora", lora_rank=4, grad_accum=2), LLAMA, round_bytes=1)
    assert one.breakdown["gradients"] == 0  # peak in the loss backward, gradients set to None
    assert two.breakdown["gradients"] == 4 * two.params["trainable_params"]  # from the 1st micro-batch
    # ... and the scalar `out.loss / grad_accum` being backpropagated
    assert two.peak_allocated_bytes == one.peak_allocated_bytes + two.breakdown["gradients"] + 4


def test_peak_by_origin_sums_to_peak():
    for plan in (_plan(method="lora", lora_rank=4, grad_ckpt=True), _plan(task="generate", prompt_len=16, new_tokens=3)):
        r = dry_run(plan, LLAMA)
        assert sum(r.peak_by_origin.values()) == r.peak_allocated_bytes
        by_cat: dict[str, int] = {}
        for key, v in r.peak_by_origin.items():
            if key != "(rest)":
                cat = key.split(" ", 1)[0]
                by_cat[cat] = by_cat.get(cat, 0) + v
        if "(rest)" not in r.peak_by_origin:
            assert by_cat == {k: v for k, v in r.breakdown.items() if v}


def test_generation_reads_do_not_depend_on_batch_beyond_two():
    from planner.backends.dryrun._programs import record_generation_reads

    plan = _plan(task="generate", batch=5, prompt_len=16, new_tokens=5)
    two = record_generation_reads(plan, LLAMA).answers  # recorded at batch 2
    five = record_generation_reads(plan, LLAMA, batch=5).answers
    assert two == five and len(two) > 5
    # and a fake run of batch 5 replays (answers recorded at batch 2) equal to the real batch-5 run
    plan = _plan(task="generate", batch=5, prompt_len=16, new_tokens=5)
    _same(dry_run(plan, LLAMA), dry_run(plan, LLAMA, device="cpu"))
