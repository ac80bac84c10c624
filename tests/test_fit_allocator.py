"""`planner fit` answers reserved and the verdict from the caching allocator simulated over the engine's
own allocation trace (planner.simulated, planner.engine.simulation): no torch, no dry run."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner import length_grid
from planner.api import fit
from planner.cli import main
from planner.engine import estimate
from planner.gpus import load_gpu
from planner.models import load_model
from planner.specs import Plan

# the README's example where reserved decides: the peak fits an A10G, the default allocator's step does not
REDUCED = ["--model", "qwen2.5-0.5b", "--batch", "4", "--seq", "2048", "--grad-ckpt", "--gpu", "a10g"]
SMALL = ["--model", "qwen2.5-0.5b", "--gpu", "h200", "--seq", "512"]


def run(argv, env=None, monkeypatch=None):
    out, err = io.StringIO(), io.StringIO()
    code = main(["fit", *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def run_json(argv):
    code, out, err = run([*argv, "--json"])
    assert code in (0, 1), err
    return code, json.loads(out)


def test_reserved_decides_the_verdict():
    """The engine's peak and its rounding model fit the card; the simulated allocator's step does not,
    and says which settings make it fit; with one of them it fits."""
    code, doc = run_json(REDUCED)
    plan = Plan(model="qwen2.5-0.5b", batch=4, seq=2048, grad_ckpt=True, gpu="a10g")
    gpu = load_gpu("a10g")
    cheap = estimate(plan, load_model(plan.model), gpu)
    assert cheap.device_bytes <= gpu.memory_bytes  # what fit said before the simulation
    a = doc["allocator"]
    assert a["simulated"] and a["fits"] is False and doc["fits"] is False and code == 1
    assert a["oom_request_bytes"] > 0 and a["capacity_bytes"] == gpu.memory_bytes - gpu.cuda_context_bytes
    assert a["min_capacity_bytes"] > a["capacity_bytes"] >= a["peak_allocated_bytes"]
    assert a["fragmentation_bytes"] == a["min_capacity_bytes"] - a["peak_allocated_bytes"]
    settings = {s["alloc_conf"]: s for s in a["settings_that_fit"]}
    assert "expandable_segments:True" in settings
    assert all(s["min_capacity_bytes"] <= a["capacity_bytes"] for s in settings.values())
    first = doc["suggestions"][0]
    assert first["change"].startswith("--alloc-conf ") and first["fits"] and first["simulated"]
    code, doc = run_json([*REDUCED, "--alloc-conf", "expandable_segments:True"])
    assert code == 0 and doc["fits"] is True and doc["allocator"]["alloc_conf"] == "expandable_segments:True"
    assert doc["allocator"]["min_capacity_bytes"] == settings["expandable_segments:True"]["min_capacity_bytes"]


def test_human_output_names_the_simulation():
    code, out, err = run(REDUCED)
    assert code == 1
    assert "DOES NOT FIT" in out and "simulated: PyTorch's caching allocator" in out
    assert "smallest card" in out and "request fails after free-and-retry" in out
    assert "--alloc-conf expandable_segments:True" in out


def test_alloc_conf_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    _, doc = run_json(SMALL)
    assert doc["allocator"]["alloc_conf"] == "max_split_size_mb:512"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:128")  # torch reads this one first
    _, doc = run_json(SMALL)
    assert doc["allocator"]["alloc_conf"] == "max_split_size_mb:128"
    _, doc = run_json([*SMALL, "--alloc-conf", ""])  # the flag wins, empty is the defaults
    assert doc["allocator"]["alloc_conf"] == ""


@pytest.mark.parametrize(("conf", "fragment"), [("max_split_sise_mb:128", "did you mean"),
                                               ("max_split_size_mb:-1", "max_split_size_mb"),
                                               ("expandable_segments:yes", "expandable_segments")])
def test_bad_alloc_conf_is_one_line_and_exit_2(conf, fragment):
    code, out, err = run([*SMALL, "--alloc-conf", conf])
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("planner: error: alloc-conf") and fragment in err


def test_a_plan_the_engine_cannot_trace_says_why():
    """GPT-2's layers are not in the trace yet: fit keeps the rounding model and its old verdict, and says so."""
    code, doc = run_json(["--model", "gpt2", "--gpu", "h200", "--seq", "512"])
    a = doc["allocator"]
    assert a["simulated"] is False and "gpt2" in a["not_simulated"]
    plan = Plan(model="gpt2", gpu="h200", seq=512)
    est = estimate(plan, load_model("gpt2"), load_gpu("h200"))
    assert doc["memory"]["reserved_bytes"] == est.reserved_bytes
    assert doc["fits"] == (est.device_bytes <= load_gpu("h200").memory_bytes)
    code, out, _ = run(["--model", "gpt2", "--gpu", "h200", "--seq", "512"])
    assert "rounding model, not simulated" in out


def test_limits_hold_under_the_simulation():
    """The largest batch and length fit says a fitting plan reaches do fit the simulated allocator, and one more does not."""
    from planner.engine.alloc_conf import AllocatorConfig
    from planner.simulated import verdict

    code, doc = run_json(["--model", "qwen2.5-0.5b", "--gpu", "t4", "--seq", "1024"])
    assert code == 0 and doc["allocator"]["simulated"]
    lim = doc["limits"]
    model, gpu = load_model("qwen2.5-0.5b"), load_gpu("t4")
    base = Plan(model="qwen2.5-0.5b", gpu="t4", seq=1024)
    for field, value in (("batch", lim["max_batch"]), ("seq", lim["max_lengths"]["seq"])):
        # a length is on the length grid (or the plan's own): the next grid value does not fit
        nxt = value + 1 if field == "batch" else length_grid.next_above(value)
        assert field == "batch" or value in (length_grid.floor(value), base.seq)
        assert verdict(base.model_copy(update={field: value}), model, gpu, AllocatorConfig())[1] is True
        assert verdict(base.model_copy(update={field: nxt}), model, gpu, AllocatorConfig())[1] is False


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 10**6), candidate=st.integers(1, 2 * 10**6), seed=st.integers(0, 1000))
def test_the_limit_search_finds_the_limit_whatever_its_candidates(limit, candidate, seed):
    """`_simulated_largest` moves by rescaled estimates; however wrong they are (here random), the
    answer is the last fitting value before the first failing one."""
    import random

    from planner.simulated import _simulated_largest

    rng = random.Random(seed)
    probed = []

    def probe(v):
        probed.append(v)
        return (v <= limit, v * 10 if v <= limit else None)

    def rescaled(at, reserved, lo, hi):
        return rng.randint(0, 2 * 10**6)

    assert _simulated_largest(1, candidate, probe, rescaled) == limit
    assert all(v > 1 for v in probed)  # never the plan's own value, which fits


def test_the_limit_search_probes_few_values_from_a_near_candidate():
    """From a candidate one past the limit, with the rescaled estimate one past again (the usual miss),
    the search settles in a handful of replays, not a bisection over the whole range."""
    from planner.simulated import _simulated_largest

    limit, probed = 7809, []

    def probe(v):
        probed.append(v)
        return (v <= limit, v)

    assert _simulated_largest(2048, limit + 2, probe, lambda at, r, lo, hi: min(limit + 2, hi - 1 if hi else limit + 2)) == limit
    assert len(probed) <= 4, probed


def test_a_step_that_fits_only_by_free_and_retry_still_says_how_far_it_goes():
    """A plan whose reserved on an unlimited card (plus the context) exceeds the card, yet runs under it
    (the allocator frees its cached segments and retries): it fits, and its limits are searched from it
    (they were none: the limits' search judged the plan itself by its scaled reserved; found by the slow
    property test)."""
    from planner.engine.alloc_conf import AllocatorConfig
    from planner.simulated import verdict

    plan = Plan(model="qwen2.5-0.5b", gpu="mi300x", batch=35, seq=2637, grad_ckpt=True, optimizer="sgd")
    res = fit(plan)
    assert res.fits and res.allocator is not None and res.memory.device_bytes > res.gpu.memory_bytes
    lim = res.limits
    assert lim is not None and lim.max_batch is not None and lim.max_batch >= plan.batch
    model, gpu = load_model(plan.model), load_gpu(plan.gpu)
    assert verdict(plan.model_copy(update={"batch": lim.max_batch + 1}), model, gpu, AllocatorConfig())[1] is False
    seq = lim.max_lengths["seq"]
    assert seq >= plan.seq and verdict(plan.model_copy(update={"seq": seq}), model, gpu, AllocatorConfig())[1] is True


def test_a_shorter_length_lowered_by_the_simulation_carries_its_own_peak():
    """Where the simulation does not fit the estimate's shorter length and lowers it, the suggestion's
    peak allocated is the lowered plan's (it was the unlowered one's; found by the property test)."""
    plan = Plan(model="llama-3.1-8b", gpu="a100-80gb", batch=40, seq=306)
    res = fit(plan)
    assert not res.fits
    seq = [s for s in res.suggestions if s.change.startswith("--seq ")]
    assert seq and all(s.simulated for s in seq)
    for s in seq:
        assert s.peak_allocated_bytes == estimate(s.plan, load_model(plan.model), load_gpu(plan.gpu)).peak_allocated_bytes
        assert s.change == f"--seq {s.plan.seq}"
