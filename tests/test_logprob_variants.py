"""The DPO/RM program variants: TRL 1.16's fused LM head (`--logprobs fused`) and a preference pair
in two forwards (`--pair-forward separate`): their log-probabilities, their estimates, bad input."""

from __future__ import annotations

import io
import json

import pytest

from planner.cli import main
from planner.engine.estimate import estimate
from planner.models import load_model
from planner.specs import Plan


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()


def _est(**kw):
    plan = Plan(**kw)
    return estimate(plan, load_model(plan.model))


def test_fused_head_holds_no_logits():
    """Full log-probs keep batch x seq x vocab fp32 tensors; the fused head's extra memory grows with
    the tokens only through hidden-sized tensors: doubling the sequence costs far less."""
    base = dict(model="qwen2.5-0.5b", task="dpo", batch=2)
    full = {s: _est(**base, seq=s).phases["policy.backward"] for s in (512, 1024)}
    fused = {s: _est(**base, seq=s, logprobs="fused").phases["policy.backward"] for s in (512, 1024)}
    V = load_model("qwen2.5-0.5b").vocab_size
    extra_tokens = 2 * 2 * 512  # rows x added positions
    assert fused[1024] < full[1024]
    # the full program's growth includes >= 3 fp32 vocabulary-wide tensors per added token
    assert (full[1024] - full[512]) - (fused[1024] - fused[512]) >= 3 * 4 * V * extra_tokens * 0.9


def test_fused_tile_buffer_is_capped_at_4096_tokens():
    """TRL's projection buffer has min(N, 4096) rows of 32768 entries: above 4096 scored positions
    it stops growing, so the reference phase grows only by hidden-sized tensors."""
    base = dict(model="llama-3.2-1b", task="dpo", logprobs="fused", method="lora", reference_pass="before")
    small, large = (_est(**base, batch=1, seq=s).phases["reference.score"] for s in (4097, 8193))
    H = load_model("llama-3.2-1b").hidden_size
    # 2 x 4096 more positions: the final hidden states, their gathered copy and the embeddings
    # (bf16), the per-token statistics and mask; no second tile buffer (32768 x 2 bytes per row)
    per_token = (large - small) / (2 * 4096)
    assert per_token < 4 * H * 2 + 64
    assert per_token > 2 * H * 2


def test_separate_forwards_lower_the_loss_peak_but_not_the_saved_activations():
    base = dict(model="qwen2.5-0.5b", task="dpo", batch=2, seq=1024, reference_pass="before")
    one, two = _est(**base), _est(**base, pair_forward="separate")
    assert one.peak_phase == two.peak_phase == "policy.backward"
    assert two.phases["policy.loss"] < one.phases["policy.loss"]
    # both graphs are alive before the backward: the activations at the peak are the same
    assert two.breakdown["activations"] == pytest.approx(one.breakdown["activations"], rel=0.01)


def test_separate_forwards_count_the_same_tokens():
    from planner.plugins import technique
    from planner.engine.timing import tokens_per_step

    for pf in ("concatenated", "separate"):
        plan = Plan(model="qwen2.5-0.5b", task="rm", batch=3, seq=256, pair_forward=pf)
        assert tokens_per_step(technique("rm").workload(plan, load_model(plan.model))) == 2 * 3 * 256


@pytest.mark.parametrize("argv,message", [
    (["--task", "sft", "--logprobs", "fused"], "logprobs: only applies with task dpo (task is sft)"),
    (["--task", "grpo", "--pair-forward", "separate"], "pair_forward: only applies with task dpo or rm (task is grpo)"),
    (["--task", "dpo", "--logprobs", "chunked"], "logprobs"),
    (["--task", "rm", "--pair-forward", "two"], "pair_forward"),
])
def test_bad_variant_input_is_one_line(argv, message):
    code, out, err = run(["fit", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", *argv])
    assert code == 2 and out == "", err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_reports_the_variant_in_json():
    code, out, err = run(["fit", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--task", "dpo", "--logprobs", "fused",
                          "--pair-forward", "separate", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["plan"]["logprobs"] == "fused" and doc["plan"]["pair_forward"] == "separate"


# ---- the real programs (torch, transformers, TRL) -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch = pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    pytest.importorskip("trl", reason="trl is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def test_fused_logprobs_equal_the_full_log_softmax_under_the_kernel_emulation(tiny_model):
    """TRL's fused head, with the CPU folds replaced as on a dry run of a GPU program
    (planner.backends.dryrun._patches.trl_triton_kernels), gives next-token log-probs and gradients equal
    to a full log-softmax's."""
    import copy

    import torch

    from planner.backends.dryrun._patches import trl_triton_kernels
    from planner_plugins.logprobs import sequence_logprobs

    ids = torch.randint(0, 500, (3, 17), generator=torch.Generator().manual_seed(1))
    ref_model = copy.deepcopy(tiny_model)
    logits = ref_model(input_ids=ids).logits
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    expected.sum().backward()
    fused_model = copy.deepcopy(tiny_model)
    with trl_triton_kernels():
        got, out = sequence_logprobs(fused_model, ids, "fused", ("log_probs", "entropy"))
        got.sum().backward()
    assert out.log_probs.shape == (3, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused_model.lm_head.weight.grad, ref_model.lm_head.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_model.model.layers[0].mlp.up_proj.weight.grad,
                               ref_model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-5)


def test_reference_after_the_policy_forward_carries_the_policy_graph():
    """TRL's order (reference scored while the policy's graph is alive) adds at least the policy's
    saved fp32 log-softmax (2 x batch x seq x vocab x 4 bytes) to the reference phase."""
    base = dict(model="qwen2.5-0.5b", task="dpo", batch=2, seq=512)
    after, before = _est(**base), _est(**base, reference_pass="before")
    V = load_model("qwen2.5-0.5b").vocab_size
    assert after.phases["reference.score"] - before.phases["reference.score"] >= 2 * 2 * 512 * V * 4
    # the policy's own phases do not change
    for k in ("policy.forward", "policy.loss", "policy.backward", "policy.optimizer"):
        assert after.phases[k] == before.phases[k]
    # precomputed log-probs: no reference phase at all
    assert not any(k.startswith("reference") for k in _est(**base, ref_logprobs="precomputed").phases)


def test_selective_logprobs_equal_the_full_log_softmax_under_the_kernel_emulation(tiny_model):
    """TRL's selective_log_softmax through the emulated Triton path gives the log-probs and gradients
    of `log_softmax(logits).gather(ids)` (same positions, as the full program)."""
    import copy

    import torch

    from planner.backends.dryrun._patches import trl_triton_kernels
    from planner_plugins.logprobs import sequence_logprobs

    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(2))
    full_model, sel_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    expected, _ = sequence_logprobs(full_model, ids, "full")
    expected.sum().backward()
    with trl_triton_kernels():
        got, _ = sequence_logprobs(sel_model, ids, "selective")
        got.sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sel_model.lm_head.weight.grad, full_model.lm_head.weight.grad, rtol=1e-4, atol=1e-5)


def test_selective_keeps_the_logits_instead_of_fp32_log_probs():
    """bf16 logits saved (2 bytes per vocabulary entry) instead of the fp32 log-softmax (4) and no
    fp32 copy: the policy's backward peak is lower than the full program's by about 2 bytes x
    tokens x vocabulary or more."""
    base = dict(model="qwen2.5-0.5b", task="dpo", batch=2, seq=1024, reference_pass="before")
    full, sel = _est(**base), _est(**base, logprobs="selective")
    V = load_model("qwen2.5-0.5b").vocab_size
    assert full.phases["policy.backward"] - sel.phases["policy.backward"] >= 2 * 2 * 1024 * V * 2
    assert sel.phases["policy.backward"] > _est(**base, logprobs="fused").phases["policy.backward"]


def test_plan_line_names_the_technique_options_that_differ():
    code, out, err = run(["fit", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--task", "dpo", "--seq", "1024",
                          "--logprobs", "fused", "--reference-pass", "before"])
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("plan"))
    assert "batch 1 x seq 1024" in line and "new tokens" not in line
    assert "logprobs fused" in line and "reference-pass before" in line and "pair-forward" not in line
    code, out, _ = run(["fit", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--task", "grpo", "--group-size", "4"])
    line = next(x for x in out.splitlines() if x.startswith("plan"))
    assert "prompt 512 + 128 new tokens" in line and "group-size 4" in line and "x seq" not in line
