"""estimate_distributed for the training techniques (rm, dpo, distill, grpo, ppo): per-rank states of
every model, per-phase peaks, TP-split heads, placement, time; the CLI; the fake-PG dry run of a
technique's step (tiny here; Llama-2-7B at FSDP8 under `-m slow`).

Expected figures come from the catalogs and the engine for the same plan, never copied."""

from __future__ import annotations

import io
import json

import pytest

from planner.cli import main
from planner.gpus import load_gpu
from planner.models import load_model
from planner.engine.distributed import LayoutError, estimate_distributed, layout_for_plan
from planner.engine.distributed.ranks import _activations
from planner.specs import Plan

H200 = load_gpu("h200")
SPEC = load_model("llama-2-7b")


def est(gpus: int = 8, model: str = "llama-2-7b", **kw):
    lay_kw = {k: kw.pop(k) for k in ("zero", "fsdp", "tp", "offload", "gpus_per_node") if k in kw}
    plan = Plan(model=model, gpu="h200", **{"batch": 1, "seq": 1024, **kw})
    lay = layout_for_plan(plan.batch, plan.grad_accum, gpus=gpus, **lay_kw)
    return estimate_distributed(plan, lay, load_model(model), H200)


def test_zero3_shards_the_frozen_reference_by_dp_and_zero2_does_not():
    ref_bytes = SPEC.num_params * 2  # the reference is a bf16 copy
    for gpus in (8, 16):
        e = est(gpus, task="dpo", zero=3, gpus_per_node=8)
        assert e.model_states["reference"]["parameters"] == pytest.approx(ref_bytes / gpus, rel=1e-6)
        assert "gradients" not in e.model_states["reference"] and "optimizer_states" not in e.model_states["reference"]
    z2 = [est(g, task="dpo", zero=2, gpus_per_node=8).model_states["reference"]["parameters"] for g in (8, 16)]
    assert z2[0] == z2[1] == pytest.approx(ref_bytes, rel=1e-6)


def test_tp_splits_the_frozen_reference():
    e = est(8, task="dpo", tp=8)
    assert e.model_states["reference"]["parameters"] == pytest.approx(SPEC.num_params * 2 / 8, rel=0.01)


def test_precomputed_reference_has_no_reference_model_or_phase():
    with_ref = est(task="dpo", fsdp="full-shard")
    pre = est(task="dpo", fsdp="full-shard", ref_logprobs="precomputed")
    assert set(pre.model_states) == {"policy"}
    assert not any(k.startswith("reference.") for k in pre.phases)
    assert any(k.startswith("reference.") for k in with_ref.phases)
    # the reference's shard is resident through the policy's step
    shard = with_ref.model_states["reference"]["parameters"]
    # (+ its buffers: the rotary inv_freq, a few hundred bytes)
    assert with_ref.phases["policy.backward"] - pre.phases["policy.backward"] == pytest.approx(shard, abs=4096)
    assert with_ref.time.total_s > pre.time.total_s


def test_reference_scored_during_the_policy_forward_sees_its_graph():
    """TRL's order (the reference after the policy's forward) keeps the policy's graph alive."""
    after = est(task="dpo", fsdp="full-shard", reference_pass="after")
    before = est(task="dpo", fsdp="full-shard", reference_pass="before")
    plan = Plan(model=SPEC.id, task="dpo", batch=1, seq=1024)
    acts = _activations(SPEC, plan, layout_for_plan(1, 1, gpus=8, fsdp="full-shard"), 0, "engine", rows=2, seq=1024,
                        loss="logprobs")
    graph = acts["activations"] + acts["loss_saved"] + acts["held"]
    assert after.phases["reference.forward"] - before.phases["reference.forward"] == pytest.approx(graph, abs=2)
    assert after.phases["policy.backward"] == before.phases["policy.backward"]


def test_separate_pair_forwards_keep_both_graphs():
    one = est(task="rm", fsdp="full-shard", pair_forward="concatenated")
    two = est(task="rm", fsdp="full-shard", pair_forward="separate")
    # the same rows in two forwards: what the layers keep is the same to first order
    assert two.phases["train.backward"] == pytest.approx(one.phases["train.backward"], rel=0.02)


def test_lora_reference_is_the_policy_with_adapters_off():
    e = est(task="dpo", zero=2, method="lora")
    assert set(e.model_states) == {"policy"}
    assert e.resident["reference"] == ["policy"]
    # the policy's optimizer states stay while it scores
    ref = e.phases["reference.forward"]
    assert ref > e.model_states["policy"]["optimizer_states"] + e.model_states["policy"]["parameters"]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_splits_the_logprobs_head(tp):
    """DPO's loss: log_softmax backward's two fp32 batch x seq x vocab tensors, vocab-parallel."""
    plan = Plan(model=SPEC.id, task="dpo", batch=1, seq=1024)
    lay = layout_for_plan(1, 1, gpus=tp, tp=tp)
    acts = _activations(SPEC, plan, lay, 0, "engine", rows=2, seq=1024, loss="logprobs")
    v_local = -(-SPEC.vocab_size // tp)
    assert acts["loss_temp"] == 2 * 4 * v_local * 2 * 1024
    assert acts["held"] == 0  # nothing of the logits is bound after the loss


def test_reward_model_head_has_no_vocabulary_tensors():
    plan = Plan(model=SPEC.id, task="rm", batch=1, seq=1024)
    lay = layout_for_plan(1, 1, gpus=8, fsdp="full-shard")
    acts = _activations(SPEC, plan, lay, 0, "engine", rows=2, seq=1024, loss="pairwise")
    assert acts["loss_temp"] < 2 * 1024 * SPEC.hidden_size * 4  # hidden-sized, not vocab-sized
    e = est(task="rm", fsdp="full-shard")
    assert set(e.model_states) == {"model"} and e.phases


def test_distill_placement():
    kw = dict(task="distill", teacher="llama-2-13b", fsdp="full-shard")
    res, off, sep = (est(**kw, frozen_placement=p) for p in ("resident", "offload", "separate"))
    teacher = res.model_states["teacher"]["parameters"]
    assert teacher == pytest.approx(load_model("llama-2-13b").num_params * 2 / 8, rel=1e-6)
    assert "teacher" in res.resident["student"] and "teacher" not in off.resident["student"]
    assert res.phases["student.backward"] - off.phases["student.backward"] == pytest.approx(teacher, abs=4096)
    assert not any(k.startswith("teacher.") for k in sep.phases) and "teacher.forward" in off.phases
    assert any("(offload)" in c.name for c in off.collectives)
    assert off.time.total_s > res.time.total_s


def test_phases_and_step_time_compose():
    e = est(task="dpo", fsdp="full-shard")
    assert e.memory.peak_allocated_bytes == max(e.phases.values())
    assert e.memory.peak_phase in e.phases
    assert sum(e.memory.breakdown.values()) == e.memory.peak_allocated_bytes
    assert e.time.total_s == pytest.approx(sum(e.phase_seconds.values()))
    assert e.time.total_s == pytest.approx(e.time.compute_s + e.time.exposed_comm_s)
    # the frozen forward all-gathers the reference's parameters under FSDP full-shard
    assert any(c.name.startswith("reference: param all-gather") for c in e.collectives)


def test_generation_is_decode_bound_and_gathers_every_token_under_zero3():
    kw = dict(task="grpo", batch=1, prompt_len=256, new_tokens=128, group_size=4)
    e = est(zero=3, **kw)
    ag = [c for c in e.collectives if c.name == "rollout: param all-gather (decode, every token)"]
    assert len(ag) == 1 and ag[0].count == 127
    z0 = est(tp=8, **kw)
    # TP: one decode step is a few all-reduces of a token's hidden state per layer, latency-bound
    tp_decode = [c for c in z0.collectives if c.name == "rollout: tp all-reduce (decode)"]
    assert tp_decode and tp_decode[0].count == 127 * (2 * SPEC.num_layers + 2)
    assert e.phase_seconds["rollout"] > e.phase_seconds["train"]
    assert {"rollout.prefill", "rollout.decode", "reference.forward", "train.loss backward"} <= set(e.phases)


def test_kv_cache_divides_by_tp():
    kw = dict(task="grpo", batch=2, prompt_len=512, new_tokens=256, group_size=4)
    kv = [est(gpus, tp=gpus, **kw) for gpus in (2, 8)]
    # KV cache on the rank at the decode moment = rows x tokens x layers x 2 x kv_heads/t x head_dim x 2
    rows, toks = 2 * 4, 512 + 256 - 1
    for e, t in zip(kv, (2, 8)):
        per_tok = 2 * SPEC.num_layers * (SPEC.num_key_value_heads // t) * SPEC.head_dim * 2
        decode = e.phases["rollout.decode"]
        assert decode > rows * toks * per_tok
    assert kv[1].phases["rollout.decode"] < kv[0].phases["rollout.decode"]


def test_ppo_has_four_models_and_two_trainings():
    e = est(task="ppo", batch=2, prompt_len=256, new_tokens=64, reward_model="llama-2-7b", fsdp="full-shard")
    assert set(e.model_states) == {"policy", "value", "reward", "reference"}
    assert "optimizer_states" in e.model_states["value"] and "optimizer_states" not in e.model_states["reward"]
    assert {"policy_train.optimizer", "value_train.optimizer"} <= set(e.phases)


@pytest.mark.parametrize("lay_kw, start", [
    (dict(pp=2), "pp: pipeline parallelism is estimated for sft only"),
    (dict(tp=2, sp=True), "sp: sequence parallelism is estimated for sft only"),
])
def test_unsupported_layouts(lay_kw, start):
    plan = Plan(model=SPEC.id, task="dpo", batch=1)
    with pytest.raises(LayoutError) as e:
        estimate_distributed(plan, layout_for_plan(1, 1, gpus=8, **lay_kw), SPEC, H200)
    assert str(e.value).startswith(start) and "\n" not in str(e.value)


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_prints_and_json_carries_phase_peaks():
    argv = ["fit", "--model", "llama-2-7b", "--gpu", "h200", "--task", "dpo", "--gpus", "8", "--fsdp", "full-shard",
            "--batch", "1", "--seq", "1024"]
    code, out, _ = run(argv)
    assert code == 0
    assert "peak of each phase" in out and "reference.forward" in out and "policy.loss backward" in out
    code, out, _ = run(argv + ["--json"])
    doc = json.loads(out)
    expect = est(task="dpo", fsdp="full-shard")
    assert doc["memory"]["phases"] == expect.phases and doc["technique"] == "dpo"
    assert doc["memory"]["peak_allocated_bytes"] == expect.memory.peak_allocated_bytes
    assert set(doc["model_states"]) == {"policy", "reference"}


@pytest.mark.parametrize("extra, start", [
    (["--task", "dpo", "--pp", "2"], "pp: pipeline parallelism"),
    (["--task", "generate"], "task: distributed estimates cover training steps"),
    (["--task", "distill"], "teacher: distill needs --teacher"),
    # every model's layout is checked: the reward model's 14 heads do not split 4 ways
    (["--task", "ppo", "--reward-model", "qwen2.5-0.5b", "--tp", "4"], "tp: 4 does not divide the 14"),
])
def test_cli_bad_input_exits_2_with_one_line(extra, start):
    code, out, err = run(["fit", "--model", "llama-2-7b", "--gpu", "h200", "--gpus", "8", *extra])
    assert code == 2 and out == ""
    msg = err.strip().splitlines()
    assert len(msg) == 1 and start in msg[0]


# ---- the dry run of a technique's step --------------------------------------------------------------
TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def test_dry_run_counts_the_frozen_reference_shard(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    from planner.backends.fakepg import dry_run_distributed

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    plan = Plan(model=str(cfg), task="dpo", batch=1, seq=64)
    lay = layout_for_plan(1, 1, gpus=4, fsdp="full-shard")
    res = dry_run_distributed(plan, lay)
    assert {"reference", "loss backward", "optimizer"} <= set(res.phases)
    n = sum(lin.in_features * lin.out_features for lin in load_model(str(cfg)).layer_linears)
    # at the optimizer step: the policy's shard and the reference's shard are both parameters (bf16),
    # the policy's gradient shard alone a gradient
    opt = res.phase_breakdowns["optimizer"]
    assert opt["parameters"] == pytest.approx(2 * opt["gradients"], rel=0.05)
    assert opt["gradients"] > 2 * n * 2 / 4 * 0.9


@pytest.mark.slow
@pytest.mark.parametrize("task, extra", [("dpo", {}), ("rm", {}),
                                         ("distill", {"teacher": "llama-2-13b"})])
def test_dry_run_7b_fsdp8_within_5_percent(task, extra):
    from planner.backends.fakepg import compare_with_estimate, dry_run_distributed

    plan = Plan(model="llama-2-7b", task=task, batch=1, seq=2048, **extra)
    lay = layout_for_plan(1, 1, gpus=8, fsdp="full-shard")
    res = dry_run_distributed(plan, lay)
    cmp = compare_with_estimate(res, plan, lay, SPEC, H200)
    assert abs(cmp["error"]) < 0.05, cmp
