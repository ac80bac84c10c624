"""The memory engine on its own: relations that follow from the programs, and the symbolic tape.

Expected values are computed from the model specs and the rules the engine documents, never copied
from a previous run. Accuracy against the dry run is in test_engine_vs_dryrun.py.
"""

from __future__ import annotations

import pytest

from planner.engine import estimate
from planner.engine.generation import kv_bytes_per_token
from planner.engine.ops import Weight, linear
from planner.engine.resident import quant_state_bytes, resident
from planner.engine.tape import Sym, Tape, tok
from planner.models import load_model
from planner.result import CATEGORIES
from planner.specs import Plan

GiB = 1 << 30


def est(**kw):
    plan = Plan(**kw)
    return estimate(plan, load_model(plan.model))


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b", "gpt2", "opt-1.3b", "mixtral-8x7b", "gemma-2-2b",
                                   "phi-3-mini"])
def test_breakdown_sums_to_peak_and_has_the_categories(model):
    for kw in (dict(), dict(method="lora", grad_ckpt=True), dict(task="generate", batch=4)):
        e = est(model=model, **kw)
        assert set(e.breakdown) == set(CATEGORIES)
        assert sum(e.breakdown.values()) == e.peak_allocated_bytes
        assert e.peak_allocated_bytes <= e.reserved_bytes <= e.device_bytes
        assert max(e.phases.values()) == e.peak_allocated_bytes
        assert e.peak_phase in e.phases


def test_full_bf16_parameters_states_and_gradients_are_exact():
    spec = load_model("llama-3.1-8b")
    e = est(model="llama-3.1-8b", batch=1, seq=512)
    assert e.breakdown["parameters"] == 2 * spec.num_params
    assert e.breakdown["optimizer_states"] == 2 * 2 * spec.num_params  # exp_avg + exp_avg_sq in bf16
    # at a short sequence the foreach AdamW step is the peak: params + grads + states + one sqrt temporary
    assert e.peak_phase == "optimizer"
    assert e.breakdown["gradients"] == 2 * spec.num_params
    assert e.breakdown["temporaries"] == 2 * spec.num_params


def test_mixed_precision_keeps_fp32_master_weights_and_states():
    spec = load_model("llama-3.2-1b")
    e = est(model="llama-3.2-1b", precision="mixed-bf16")
    assert e.breakdown["parameters"] == 4 * spec.num_params
    assert e.breakdown["optimizer_states"] == 8 * spec.num_params


def test_optimizers_order_their_state():
    states = {o: est(model="llama-3.2-1b", optimizer=o, batch=1, seq=256).breakdown["optimizer_states"]
              for o in ("adamw", "adamw-fused", "adamw-8bit", "sgd")}
    assert states["sgd"] == 0
    assert states["adamw-8bit"] < states["adamw"] <= states["adamw-fused"]
    paged = est(model="llama-3.2-1b", optimizer="paged-adamw-8bit", batch=1, seq=256)
    assert paged.outside_allocator["paged_optimizer_states"] > 0
    assert paged.breakdown["optimizer_states"] < states["adamw-8bit"]


def test_gradient_checkpointing_lowers_activation_heavy_peaks():
    off = est(model="llama-3.1-8b", batch=4, seq=4096)
    on = est(model="llama-3.1-8b", batch=4, seq=4096, grad_ckpt=True)
    assert on.breakdown["activations"] < off.breakdown["activations"] / 3
    assert on.peak_allocated_bytes < off.peak_allocated_bytes


def test_activations_grow_linearly_with_tokens_for_sdpa():
    a = est(model="qwen2.5-0.5b", method="lora", batch=2, seq=1024).breakdown["activations"]
    b = est(model="qwen2.5-0.5b", method="lora", batch=4, seq=1024).breakdown["activations"]
    c = est(model="qwen2.5-0.5b", method="lora", batch=2, seq=2048).breakdown["activations"]
    assert b == c  # SDPA keeps no seq x seq scores: only batch x seq matters
    assert 1.9 < b / a <= 2.0


def test_eager_attention_keeps_quadratic_scores():
    sdpa = est(model="qwen2.5-0.5b", batch=1, seq=4096).breakdown["activations"]
    eager = est(model="qwen2.5-0.5b", batch=1, seq=4096, attn="eager").breakdown["activations"]
    spec = load_model("qwen2.5-0.5b")
    # at least the fp32 softmax output, heads x seq x seq per layer
    assert eager - sdpa >= spec.num_layers * spec.num_attention_heads * 4096 * 4096 * 4


def test_lora_adapters_follow_peft_shapes():
    spec = load_model("llama-3.1-8b")
    r = 8
    res = resident(spec, Plan(model="llama-3.1-8b", method="lora", lora_rank=r))
    per_layer = sum(r * (lin.in_features + lin.out_features) for lin in spec.layer_linears)
    assert res.adapter_bytes == 4 * per_layer * spec.num_layers  # fp32 adapters
    only_qv = resident(spec, Plan(model="llama-3.1-8b", method="lora", lora_rank=r, lora_targets="q_proj,v_proj"))
    qv = [lin for lin in spec.layer_linears if lin.name in ("q_proj", "v_proj")]
    assert only_qv.adapter_bytes == 4 * spec.num_layers * sum(r * (lin.in_features + lin.out_features) for lin in qv)


def test_unknown_lora_target_is_a_clear_error():
    with pytest.raises(ValueError, match="lora_targets: qq_proj not found"):
        est(model="llama-3.1-8b", method="lora", lora_targets="qq_proj")


def test_qlora_packs_linears_in_half_a_byte():
    spec = load_model("llama-3.1-8b")
    res = resident(spec, Plan(model="llama-3.1-8b", method="qlora", lora_rank=16))
    linear = spec.linear_params_per_layer * spec.num_layers
    other = spec.num_params - linear
    # packed 4-bit linears, every other parameter cast to fp32 by prepare_model_for_kbit_training, fp32 adapters
    assert res.param_bytes == linear // 2 + 4 * other + res.adapter_bytes
    no_prep = resident(spec, Plan(model="llama-3.1-8b", method="qlora", kbit_prep=False))
    assert no_prep.param_bytes == linear // 2 + 2 * other + no_prep.adapter_bytes


def test_double_quantization_shrinks_the_constants_as_the_qlora_paper_says():
    n = 4096 * 4096
    single = quant_state_bytes(n, double_quant=False) * 8 / n  # bits per parameter
    double = quant_state_bytes(n, double_quant=True) * 8 / n
    assert single == pytest.approx(32 / 64, abs=0.001)  # fp32 absmax per 64 weights
    assert double == pytest.approx(8 / 64 + 32 / (64 * 256), abs=0.001)


def test_quant_state_bytes_match_bitsandbytes():
    torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    w = torch.randn(256, 512, dtype=torch.bfloat16)
    for nested in (False, True):
        _, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        tensors = [qs.absmax, qs.code]
        if nested:
            tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
        measured = sum(t.numel() * t.element_size() for t in tensors)
        assert quant_state_bytes(w.numel(), nested) == measured


def test_generation_kv_cache_is_the_formula():
    spec = load_model("opt-13b")
    # the vLLM paper's figure: 800 KiB per token for OPT-13B in 16-bit
    assert kv_bytes_per_token(spec, "bf16") == 2 * spec.num_layers * spec.hidden_size * 2 == 800 * 1024
    e = est(model="llama-3.1-8b", task="generate", batch=8, prompt_len=1024, new_tokens=2048)
    per_tok = kv_bytes_per_token(load_model("llama-3.1-8b"), "bf16")
    assert e.peak_phase == "decode"
    final = per_tok * 8 * (1024 + 2048 - 1)
    one_layer_k = final // 32 // 2
    assert e.breakdown["kv_cache"] == final + one_layer_k


def test_tape_saves_only_what_gradients_need():
    tp = Tape()
    x = tp.new(tok(10), "bf16", True, "x")
    frozen = Weight(10, 20, "bf16", trainable=False)
    y = linear(tp, x, frozen, None, "frozen")  # needs grad wrt x only: saves no activation
    assert tp.saved_total == Sym()
    trainable = Weight(20, 5, "bf16", trainable=True)
    linear(tp, y, trainable, None, "trained")  # weight grad needs the input
    assert tp.saved_total == Sym(t=20 * 2)


def test_tape_autocast_copies_inputs_and_weights():
    tp = Tape()
    x = tp.new(tok(8), "fp32", True, "x")
    linear(tp, x, Weight(8, 4, "fp32", trainable=True), "bf16", "lin")
    # saved: the bf16 cast of x (for the weight grad) and the bf16 cast of the weight (for x's grad)
    assert tp.saved_total == Sym(c=8 * 4 * 2, t=8 * 2)


def test_estimate_is_cached_per_shape_but_exact_per_size():
    a = est(model="llama-3.2-1b", batch=1, seq=1024)
    b = est(model="llama-3.2-1b", batch=2, seq=512)
    c = est(model="llama-3.2-1b", batch=2, seq=1024)
    assert a.peak_allocated_bytes == b.peak_allocated_bytes  # same tokens, no seq^2 term
    assert c.peak_allocated_bytes > a.peak_allocated_bytes


def test_frozen_placement_moves_the_teacher_off_the_student_phases():
    kw = dict(model="llama-3.2-1b", task="distill", teacher="llama-3.1-8b", batch=1, seq=1024)
    resident_ = est(**kw)
    offload = est(**kw, frozen_placement="offload")
    separate = est(**kw, frozen_placement="separate")
    teacher = resident(load_model("llama-3.1-8b"), Plan(model="llama-3.1-8b"))  # bf16, frozen
    teacher_bytes = teacher.param_bytes + teacher.buffer_bytes
    assert teacher.param_bytes == 2 * load_model("llama-3.1-8b").num_params
    assert resident_.phases["student.loss"] - offload.phases["student.loss"] == teacher_bytes
    assert "teacher.forward" in offload.phases and "teacher.forward" not in separate.phases
    assert separate.peak_allocated_bytes == separate.phases[separate.peak_phase] <= offload.peak_allocated_bytes


def test_hard_labels_add_a_cross_entropy_to_distillation():
    kw = dict(model="qwen2.5-0.5b", task="distill", teacher="qwen2.5-1.5b", batch=2, seq=1024)
    soft = est(**kw)
    mixed = est(**kw, hard_label_weight=0.5)
    V, T = load_model("qwen2.5-0.5b").vocab_size, 2 * 1024
    # the loss phase still peaks in the KL term; the backward now starts with the cross-entropy's,
    # whose saved log-softmax and two fp32 gradients join the KL's saved tensors
    assert mixed.phases["student.loss"] == soft.phases["student.loss"]
    assert mixed.phases["student.backward"] - soft.phases["student.backward"] >= 2 * T * V * 4
