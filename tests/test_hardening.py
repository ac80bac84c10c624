"""The hardening issue's items, one test (or more) each: what a user hit, and what they get now."""

from __future__ import annotations

import importlib.util
import io
import json
from fractions import Fraction

import pytest

from planner import length_grid
from planner.api import fit, fit_distributed
from planner.cli import main
from planner.engine import estimate
from planner.engine.tape import Sym
from planner.gpus import load_gpu
from planner.models import load_model
from planner.specs import Plan


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# ---- 1. huge inputs answer at once, exactly ---------------------------------------------------------
def test_sym_is_exact_beyond_float_range():
    s = Sym(c=3.0, t=12345.0, q=0.5)
    t, q = 10**30, 4097
    assert s.at(t, q) == Fraction(3) + 12345 * t + Fraction(1, 2) * t * q


@pytest.mark.parametrize("batch", [10**12, 10**30 - 2])
def test_peak_is_exact_and_linear_in_a_huge_batch(batch):
    """The peak of a full fine-tune is affine in the batch at a fixed moment: exact integers show it."""
    model, gpu = load_model("llama-3.1-8b"), load_gpu("a100-80gb")
    peaks = [estimate(Plan(model="llama-3.1-8b", batch=b, seq=2048), model, gpu).peak_allocated_bytes
             for b in (batch, batch + 1, batch + 2)]
    assert all(isinstance(p, int) for p in peaks)
    assert peaks[2] - peaks[1] == peaks[1] - peaks[0] > 0


@pytest.mark.parametrize("task, extra", [("sft", []), ("dpo", []), ("generate", [])])
def test_huge_batch_is_a_does_not_fit_answer_with_a_fitting_batch(task, extra):
    code, out, err = run(["fit", "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--task", task,
                          "--batch", str(10**12), *extra, "--json"])
    assert code == 1, err
    doc = json.loads(out)
    assert not doc["fits"]
    fitting = [s for s in doc["suggestions"] if s["fits"]]
    assert fitting, doc["suggestions"]
    assert all(s["device_bytes"] <= doc["gpu"]["memory_bytes"] for s in fitting)


def test_batch_suggestion_is_the_largest_that_fits_among_all_integers():
    plan = Plan(model="llama-3.1-8b", gpu="a100-80gb", task="generate", batch=10**9, prompt_len=512, new_tokens=128)
    res = fit(plan)
    s = next(x for x in res.suggestions if x.change.startswith("--batch"))
    assert s.fits
    model, gpu = load_model(plan.model), res.gpu
    above = plan.model_copy(update={"batch": s.plan.batch + 1})
    assert estimate(above, model, gpu).device_bytes > gpu.memory_bytes


# ---- layouts refused, not silently changed ---------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--gpus", "8", "--zero", "3", "--fsdp", "full-shard"], "not both"),
    (["--gpus", "8", "--gpus-per-node", "16"], "gpus_per_node: 16 GPUs per node exceed the 8 GPUs"),
])
def test_layouts_that_were_silently_accepted_are_refused(argv, needle):
    code, out, err = run(["fit", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", *argv])
    assert code == 2 and out == "" and needle in err


def test_validate_without_torch_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    for argv in (["validate", "--model", "qwen2.5-0.5b"], ["validate", "--suite", "smoke"]):
        code, out, err = run(argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1
        assert "torch" in err and "pip install" in err


def test_validate_help_lists_every_suite():
    from planner.suites import SUITES

    code, out, _ = run(["validate", "--help"])
    assert code == 0
    flat = " ".join(out.split())
    for name in SUITES:
        assert name in flat


# ---- 2. suggestions for every technique and for many GPUs ----------------------------------------------
@pytest.mark.parametrize("fields", [
    dict(model="llama-3.1-8b", gpu="rtx-4090", task="dpo", method="lora", batch=1, seq=1024),
    dict(model="llama-3.1-8b", gpu="a100-80gb", task="rm", batch=8, seq=4096),
])
def test_grad_ckpt_is_suggested_for_techniques_and_fits(fields):
    res = fit(Plan(**fields))
    assert not res.fits
    ck = next(s for s in res.suggestions if s.change == "--grad-ckpt")
    alone = estimate(ck.plan, load_model(ck.plan.model), res.gpu)
    assert ck.fits and alone.device_bytes <= res.gpu.memory_bytes


def test_technique_options_are_suggested_only_where_the_technique_reads_them():
    dpo = fit(Plan(model="llama-3.1-8b", gpu="rtx-4090", task="dpo", batch=2, seq=2048))
    changes = {s.change for s in dpo.suggestions}
    assert {"--logprobs fused", "--grad-ckpt"} <= changes
    sft = fit(Plan(model="llama-3.1-8b", gpu="rtx-4090", batch=2, seq=2048))
    assert not any(c.startswith(("--logprobs", "--reference-pass", "--frozen-placement"))
                   for c in (s.change for s in sft.suggestions))
    grpo = fit(Plan(model="llama-3.1-8b", gpu="rtx-4090", task="grpo", batch=4, group_size=16, prompt_len=1024,
                    new_tokens=1024))
    assert any(s.change.startswith("--group-size") for s in grpo.suggestions)


def test_many_gpus_get_layout_suggestions_each_re_estimated():
    plan = Plan(model="llama-3.1-8b", gpu="h100-sxm", batch=4, seq=512, grad_ckpt=True)
    res = fit_distributed(plan, {"gpus": 2, "zero": 1})
    assert not res.estimate.fits
    changes = {s.change for s in res.suggestions}
    assert {"--zero 3", "--offload optimizer"} <= changes and any(c.startswith("--gpus") for c in changes)
    for s in res.suggestions:
        again = fit_distributed(s.plan, s.layout, with_suggestions=False)
        assert again.estimate.memory.device_bytes == s.device_bytes and again.estimate.fits == s.fits, s.change
    more = next(s for s in res.suggestions if s.change.startswith("--gpus"))
    fewer = fit_distributed(plan, {**more.layout, "gpus": more.layout["gpus"] // 2}, with_suggestions=False)
    assert more.fits and not fewer.estimate.fits, "the fewest GPUs that fit"


def test_many_gpus_print_warnings():
    code, out, err = run(["fit", "--model", "llama-3.1-8b", "--gpu", "t4", "--gpus", "8", "--zero", "3",
                          "--seq", "512", "--grad-ckpt"])
    assert "bf16" in err and "warning" in err


def test_a_fitting_plan_says_how_far_it_goes():
    code, out, _ = run(["fit", "--model", "qwen2.5-0.5b", "--gpu", "h200", "--batch", "1", "--seq", "512", "--json"])
    doc = json.loads(out)
    lim = doc["limits"]
    model, gpu = load_model("qwen2.5-0.5b"), load_gpu("h200")
    base = Plan(model="qwen2.5-0.5b", gpu="h200", batch=1, seq=512)
    from planner.engine.alloc_conf import AllocatorConfig
    from planner.simulated import verdict

    assert doc["allocator"]["simulated"]  # so the limits are the simulated allocator's
    for knob, v in (("batch", lim["max_batch"]), ("seq", lim["max_lengths"]["seq"])):
        nxt = v + 1 if knob == "batch" else length_grid.next_above(v)  # a length's next grid value
        assert verdict(base.model_copy(update={knob: v}), model, gpu, AllocatorConfig())[1] is True
        assert verdict(base.model_copy(update={knob: nxt}), model, gpu, AllocatorConfig())[1] is False
    code, text, _ = run(["fit", "--model", "qwen2.5-0.5b", "--gpu", "h200", "--batch", "1", "--seq", "512"])
    assert f"{lim['max_batch']:,}" in text and f"{lim['max_lengths']['seq']:,}" in text
    # a length limit says the grid step it is stated to (planner.length_grid)
    step = length_grid.next_above(lim["max_lengths"]["seq"]) - lim["max_lengths"]["seq"]
    assert f"{lim['max_lengths']['seq']:,} tokens (to a step of {step})" in text


# ---- 3. figures that contradicted each other -----------------------------------------------------------
def test_zero_stages_compare_like_for_like_within_one_engine():
    plan = Plan(model="llama-3.1-8b", gpu="h100-sxm", batch=4, seq=512, grad_ckpt=True)
    peaks = [fit_distributed(plan, {"gpus": 2, "zero": z, "engine": "deepspeed"}, with_suggestions=False)
             .estimate.memory.peak_allocated_bytes for z in range(4)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[1]
    torch0 = fit_distributed(plan, {"gpus": 2, "zero": 0}, with_suggestions=False).estimate
    ds1 = fit_distributed(plan, {"gpus": 2, "zero": 1}, with_suggestions=False).estimate
    assert torch0.engine.startswith("torch DDP") and "no master copy" in torch0.engine
    assert ds1.engine.startswith("DeepSpeed ZeRO-1") and "fp32 master weights" in ds1.engine


def test_generation_in_4bit_gets_no_kbit_preparation():
    """A 4-bit model that generates keeps its load dtype: kbit preparation is for training."""
    gen = Plan(model="qwen2.5-0.5b", task="generate", method="qlora", batch=4, prompt_len=512, new_tokens=64)
    model = load_model(gen.model)
    from planner.engine.resident import resident
    from planner.plugins import technique

    use = technique("generate").workload(gen, model).models[0]
    assert resident(model, use.setup).non_linear_dtype == "bf16"
    trained = technique("sft").workload(Plan(model="qwen2.5-0.5b", method="qlora"), model).models[0]
    assert resident(model, trained.setup).non_linear_dtype == "fp32"


def test_mixtral_qlora_warns_about_unquantized_experts():
    res = fit(Plan(model="mixtral-8x7b", gpu="h200", method="qlora", batch=1, seq=512), with_suggestions=False)
    w = [x for x in res.warnings if "experts" in x]
    assert w and "fp32" in w[0] and "GiB" in w[0]


# ---- 4. conventions ---------------------------------------------------------------------------------------
def test_yaml_plans_take_layout_keys(tmp_path):
    f = tmp_path / "plan.yaml"
    f.write_text("model: llama-3.1-8b\ngpu: h100-sxm\ngpus: 8\nzero: 3\ncpu-memory: 1TiB\noffload: optimizer\n")
    code, out, err = run(["fit", str(f), "--json"])
    doc = json.loads(out)
    assert doc["layout"]["gpus"] == 8 and doc["layout"]["zero"] == 3 and doc["cpu_memory"]["node_bytes"] == 2**40
    code, out, _ = run(["fit", str(f), "--zero", "2", "--json"])  # flags override the file
    assert json.loads(out)["layout"]["zero"] == 2


def test_offloaded_states_must_fit_the_nodes_cpu_memory():
    plan = Plan(model="llama-3.1-8b", gpu="t4", precision="fp16", batch=1, seq=512, grad_ckpt=True)
    lay = {"gpus": 8, "zero": 3, "offload": "optimizer"}
    roomy = fit_distributed(plan, {**lay, "cpu_memory": 2**40}, with_suggestions=False).estimate
    tight = fit_distributed(plan, {**lay, "cpu_memory": 100 * 2**30}, with_suggestions=False).estimate
    assert roomy.cpu_bytes_per_node == tight.cpu_bytes_per_node > 100 * 2**30
    assert roomy.fits and not tight.fits
    code, out, _ = run(["fit", "--model", "llama-3.1-8b", "--gpu", "t4", "--precision", "fp16", "--seq", "512",
                        "--grad-ckpt", "--gpus", "8", "--zero", "3", "--offload", "optimizer", "--cpu-memory", "100GiB"])
    assert code == 1 and "CPU memory per node" in out
