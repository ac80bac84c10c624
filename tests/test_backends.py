"""Every built-in technique runs for real on a tiny model on the CPU, through the same step function
the dry run executes on fake tensors, and both account the same bytes per category. Bad input for
backends and suites. Seconds each."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("peft", reason="peft is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")

from planner.backends import BackendError, check_backend, run_backend  # noqa: E402
from planner.cli import main  # noqa: E402
from planner.specs import Plan  # noqa: E402

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, layers in (("tiny-student", 2), ("tiny-teacher", 3)):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(TINY, num_hidden_layers=layers)))
        paths[name] = str(d)
    return paths


CASES = {
    "sft": dict(task="sft", batch=2, seq=32),
    "sft-lora-ckpt": dict(task="sft", batch=2, seq=32, method="lora", lora_rank=4, grad_ckpt=True),
    "sft-qlora": dict(task="sft", batch=2, seq=32, method="qlora", lora_rank=4),
    "generate": dict(task="generate", batch=2, prompt_len=16, new_tokens=4),
    "rm": dict(task="rm", batch=2, seq=32),
    "dpo": dict(task="dpo", batch=2, seq=32),
    "dpo-lora": dict(task="dpo", batch=1, seq=32, method="lora", lora_rank=4),
    "dpo-fused": dict(task="dpo", batch=2, seq=32, logprobs="fused"),
    "dpo-fused-lora-mixed": dict(task="dpo", batch=1, seq=32, method="lora", lora_rank=4, precision="mixed-bf16",
                                 logprobs="fused"),
    "dpo-selective": dict(task="dpo", batch=2, seq=32, logprobs="selective"),
    "dpo-separate": dict(task="dpo", batch=2, seq=32, pair_forward="separate"),
    "dpo-reference-before": dict(task="dpo", batch=2, seq=32, reference_pass="before"),
    "rm-separate": dict(task="rm", batch=2, seq=32, pair_forward="separate"),
    "distill": dict(task="distill", batch=2, seq=32),
    "distill-hard-labels": dict(task="distill", batch=2, seq=32, hard_label_weight=0.5),
    "grpo": dict(task="grpo", batch=1, group_size=2, prompt_len=8, new_tokens=4),
    "ppo": dict(task="ppo", batch=2, prompt_len=8, new_tokens=4, mini_batch=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_cpu_run_accounts_like_the_dry_run(tiny, case):
    kw = dict(CASES[case])
    if kw["task"] == "distill":
        kw["teacher"] = tiny["tiny-teacher"]
    if kw["task"] == "ppo":
        kw["reward_model"] = tiny["tiny-teacher"]
    plan = Plan(model=tiny["tiny-student"], **kw)
    real = run_backend("real", plan, "cpu", steps=2)
    fake = run_backend("dry-run", plan, "fake", steps=2)
    assert real.peak_allocated_bytes and real.peak_allocated_bytes == fake.peak_allocated_bytes
    assert real.breakdown == fake.breakdown
    assert real.peak_phase == fake.peak_phase
    if kw["task"] != "generate":
        assert real.breakdown["optimizer_states"] > 0  # the steady step, with states, was measured


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()


def test_unknown_backend_suggests(tiny):
    with pytest.raises(BackendError, match="backend: unknown backend 'dryrun' \\(did you mean: dry-run"):
        check_backend("dryrun", None)
    code, out, err = run(["validate", "--model", tiny["tiny-student"], "--backend", "rael"])
    assert code == 2 and out == "" and "did you mean: real" in err and len(err.splitlines()) == 1


def test_backend_that_cannot_run_on_the_device_says_why():
    with pytest.raises(BackendError, match="dry run executes on fake tensors"):
        check_backend("dry-run", "cuda")
    with pytest.raises(BackendError, match="real runs use real tensors"):
        check_backend("real", "fake")


def test_real_on_cuda_without_a_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be observed")
    with pytest.raises(BackendError, match="torch.cuda.is_available\\(\\) is False"):
        check_backend("real", "cuda")


def test_unknown_suite_is_one_line():
    code, out, err = run(["validate", "--suite", "dryrun"])
    assert code == 2 and out == ""
    assert err.strip() == "planner: error: suite: unknown suite 'dryrun' (did you mean: dry-run?); choose from smoke, dry-run, alignment, gpu, time-cpu"


def test_validate_one_plan_prints_the_comparison(tiny):
    code, out, err = run(["validate", "--model", tiny["tiny-student"], "--batch", "2", "--seq", "32",
                          "--backend", "real", "--device", "cpu", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["measurement"]["backend"] == "real" and doc["measurement"]["device"] == "cpu"
    assert doc["measurement"]["peak_allocated_bytes"] > 0


def test_validate_simulates_the_allocator(tiny):
    """The dry run's allocation trace through the simulated caching allocator: reserved, the verdict
    on the card and the smallest card memory, in the text and in the JSON."""
    argv = ["validate", "--model", tiny["tiny-student"], "--batch", "2", "--seq", "32", "--gpu-memory", "1GiB"]
    code, out, err = run([*argv, "--json"])
    assert code == 0, err
    a = json.loads(out)["measurement"]["allocator"]
    assert a["alloc_conf"] == "" and a["fits"] is True
    assert a["peak_allocated_bytes"] <= a["min_capacity_bytes"] <= a["reserved_bytes"]
    assert a["fragmentation_bytes"] == a["min_capacity_bytes"] - a["peak_allocated_bytes"]
    code, out, err = run([*argv, "--alloc-conf", "expandable_segments:True"])
    assert code == 0, err
    assert "simulated" in out and "expandable_segments:True" in out and "smallest card" in out


def test_validate_reads_the_allocator_environment(tiny, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    code, out, err = run(["validate", "--model", tiny["tiny-student"], "--batch", "2", "--seq", "32", "--json"])
    assert code == 0, err
    assert json.loads(out)["measurement"]["allocator"]["alloc_conf"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:maybe")
    code, out, err = run(["validate", "--model", tiny["tiny-student"], "--batch", "2", "--seq", "32"])
    assert code == 2 and "expandable_segments" in err and "\n" not in err.strip()
