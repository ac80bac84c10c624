"""`planner plan`: the search's properties, Megatron-LM's published layouts, bad input."""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from functools import partial
from pathlib import Path

import pytest

from planner.cli import main
from planner.search import _layouts, _micro_batches, build_space, search
from planner.specs import Plan

PINNED = {"method", "optimizer"}  # a small space: full fine-tunes with adamw-fused


def _search(gpu="a10g", max_gpus=4, **kw):
    plan = Plan(model="qwen2.5-0.5b", gpu=gpu, seq=1024, optimizer="adamw-fused", method="full")
    return search(plan, global_batch=16, max_gpus=max_gpus, pinned=PINNED, top=5, **kw)


def test_more_gpus_never_give_a_slower_best_plan():
    few, many = _search(max_gpus=2), _search(max_gpus=4)
    assert few.best and many.best
    assert many.best[0].tokens_per_s >= few.best[0].tokens_per_s


def test_a_larger_card_never_turns_the_best_plan_into_one_that_does_not_fit():
    from planner.api import fit, fit_distributed

    best = _search(gpu="a10g", max_gpus=2).best[0]
    bigger = Plan(**{**best.plan, "gpu": "a100-80gb"})
    if best.gpus == 1:
        assert fit(bigger.model_copy(update={"grad_accum": best.grad_accum}), with_suggestions=False).fits
    else:
        fields = {k: v for k, v in best.layout.items() if k != "micro_batch"}
        assert fit_distributed(bigger, fields, with_suggestions=False).estimate.fits


def test_every_plan_returned_fits_when_estimated_alone():
    from planner.api import fit, fit_distributed

    r = _search(max_gpus=4)
    for c in r.best:
        p = Plan(**c.plan)
        if c.gpus == 1:
            assert fit(p.model_copy(update={"grad_accum": c.grad_accum}), with_suggestions=False).fits
        else:
            assert fit_distributed(p, {k: v for k, v in c.layout.items() if k != "micro_batch"},
                                   with_suggestions=False).estimate.fits


def test_the_best_is_at_least_as_fast_as_a_random_sample_of_the_space():
    from planner.engine.distributed import estimate_distributed, make_layout
    from planner.gpus import resolve_gpu
    from planner.models import load_model

    r = _search(max_gpus=4)
    plan = Plan(model="qwen2.5-0.5b", gpu="a10g", seq=1024, optimizer="adamw-fused", method="full")
    spec, gpu = load_model(plan.model), resolve_gpu("a10g", None)
    space = build_space(plan, PINNED, {}, 4, 8, 1, True)
    layouts, _ = _layouts(space, spec, 8, 16)
    everything = [(lay, b, ckpt, prec)
                  for lay in layouts for b in _micro_batches(space, 16, lay["gpus"] // (lay["tp"] * lay["pp"]))
                  for ckpt, prec in itertools.product(space.ckpts, space.precisions)]
    rng = random.Random(3)
    for lay, b, ckpt, prec in rng.sample(everything, 40):
        try:
            layout = make_layout(micro_batch=b, **lay)
        except ValueError:
            continue  # the layout rules refuse it (the search counts it invalid)
        p = plan.model_copy(update={"batch": b, "grad_accum": layout.grad_accum, "grad_ckpt": ckpt, "precision": prec})
        e = estimate_distributed(p, layout, spec, gpu)
        if e.fits:
            assert e.tokens_per_s <= r.best[0].tokens_per_s * (1 + 1e-9), (lay, b, ckpt)


def test_skipped_and_priced_add_up_and_dominated_regions_are_named():
    r = _search(max_gpus=2)
    assert r.estimated + r.pruned <= r.space
    assert r.estimated > 0 and r.fitting > 0
    assert any("mixed-bf16 skipped" in n for n in r.notes) and any("adamw skipped" not in n for n in r.notes)


# ---- Megatron-LM's Table 1 (Narayanan et al. 2021): the search finds layouts at least as fast ----
DATA = Path(__file__).parent / "data"
with open(DATA / "megatron_throughput.csv", newline="") as f:
    ROWS = list(csv.DictReader(f))


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['params_b']}B")
def test_megatron_rows_best_plan_is_at_least_as_fast_as_the_published_layout(row):
    from planner.engine.distributed import estimate_distributed, make_layout
    from planner.gpus import load_gpu
    from test_parallel_megatron import SEQ, gpt

    spec = gpt(row)
    a100 = load_gpu("a100-80gb")
    run = partial(estimate_distributed, activations="megatron", style="megatron")
    plan = Plan(model=spec.id, gpu="a100-80gb", precision="mixed-fp16", method="full", optimizer="adamw",
                grad_ckpt=True, attn="eager", seq=SEQ)
    gpus, gb = int(row["gpus"]), int(row["global_batch"])
    published = make_layout(gpus=gpus, gpus_per_node=8, tp=int(row["tp"]), pp=int(row["pp"]), micro_batch=1,
                            global_batch=gb)
    theirs = run(plan.model_copy(update={"batch": 1, "grad_accum": published.grad_accum}), published, spec, a100)
    r = search(plan, global_batch=gb, max_gpus=gpus, pinned={"precision", "method", "optimizer", "grad_ckpt"},
               layout_pins={"gpus": gpus, "zero": 0}, spec=spec, estimate=run, final_check=False, top=1)
    best = r.best[0]
    assert best.fits
    assert best.tokens_per_s >= theirs.tokens_per_s * (1 - 1e-9), (best.layout, theirs.tokens_per_s)


# ---- the command ------------------------------------------------------------------------
def _plan_cli(*extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["plan", "--model", "qwen2.5-0.5b", "--seq", "1024", "--method", "full", "--optimizer",
                 "adamw-fused", *extra], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_prints_the_best_plans_with_fit_commands_and_saves_them(tmp_path):
    code, out, err = _plan_cli("--gpu", "a10g", "--global-batch", "16", "--max-gpus", "2", "--top", "3",
                               "--save", str(tmp_path))
    assert code == 0, err
    assert "best by tokens-per-s" in out and "planner fit --model qwen2.5-0.5b" in out and "Pareto front" in out
    saved = sorted(tmp_path.glob("plan-*.yaml"))
    assert 1 <= len(saved) <= 3
    out2, err2 = io.StringIO(), io.StringIO()
    assert main(["fit", str(saved[0]), "--no-suggest"], stdout=out2, stderr=err2) == 0, err2.getvalue()
    code, out, _ = _plan_cli("--gpu", "a10g", "--global-batch", "16", "--max-gpus", "2", "--top", "2", "--json")
    doc = json.loads(out)
    assert doc["best"][0]["fit_command"].startswith("planner fit") and doc["objective"] == "tokens-per-s"


def test_cost_objective_takes_prices():
    code, out, err = _plan_cli("--gpu", "a10g", "--global-batch", "16", "--max-gpus", "2", "--objective", "cost",
                               "--price", "a10g=1.2", "--json")
    assert code == 0, err
    best = json.loads(out)["best"]
    assert all(b["cost_per_mtok"] is not None for b in best)
    assert [b["cost_per_mtok"] for b in best] == sorted(b["cost_per_mtok"] for b in best)


@pytest.mark.parametrize("extra,message", [
    (("--gpu", "a10g", "--global-batch", "16", "--objective", "speed"), "objective: unknown objective 'speed'"),
    (("--gpu", "a10g", "--global-batch", "16", "--max-gpus", "4", "--tp", "8"),
     "max_gpus: 4 is below the pinned layout's 8 GPUs"),
    (("--gpu", "a10g", "--global-batch", "16", "--objective", "cost"), "cost: no price for a10g"),
    (("--gpu", "a10g"), "global_batch: give --global-batch N"),
    (("--global-batch", "16",), "gpu: give --gpu ID"),
    (("--gpu", "a10g", "--global-batch", "16", "--price", "a10g=free"), "price: give CARD=USD_PER_HOUR"),
])
def test_bad_input_is_one_line(extra, message):
    code, out, err = _plan_cli(*extra)
    assert code == 2 and message in err and err.count("\n") == 1 and out == ""


def test_an_empty_space_says_what_came_closest():
    out, err = io.StringIO(), io.StringIO()
    code = main(["plan", "--model", "llama-3.1-70b", "--gpu", "a10g", "--seq", "4096", "--method", "full",
                 "--optimizer", "adamw-fused", "--grad-ckpt", "--global-batch", "8", "--max-gpus", "1"],
                stdout=out, stderr=err)
    assert code == 1
    assert "NOTHING FITS: the closest plan needs" in out.getvalue() and "short by" in out.getvalue()


def test_gpu_any_searches_every_card_and_names_each_plans_card():
    code, out, err = _plan_cli("--gpu", "any", "--global-batch", "16", "--max-gpus", "1", "--top", "3", "--json")
    assert code == 0, err
    doc = json.loads(out)
    from planner.gpus import gpu_ids

    assert doc["best"] and all(b["plan"]["gpu"] in gpu_ids() for b in doc["best"])
    speeds = [b["tokens_per_s"] for b in doc["best"]]
    assert speeds == sorted(speeds, reverse=True)
    single = json.loads(_plan_cli("--gpu", doc["best"][0]["plan"]["gpu"], "--global-batch", "16", "--max-gpus", "1",
                                  "--top", "1", "--json")[1])
    assert single["best"][0]["tokens_per_s"] == speeds[0]  # the best card's own best


def test_max_batch_and_max_seq_are_fits_limits():
    from planner.api import fit

    out, err = io.StringIO(), io.StringIO()
    code = main(["plan", "--model", "qwen2.5-0.5b", "--gpu", "a10g", "--batch", "1", "--seq", "1024", "--max-batch",
                 "--max-seq", "--json"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    doc = json.loads(out.getvalue())
    lim = fit(Plan(model="qwen2.5-0.5b", gpu="a10g", batch=1, seq=1024)).limits
    assert doc["max_batch"] == lim.max_batch and doc["max_seq"] == lim.max_lengths["seq"]


def test_the_pareto_front_equals_the_quadratic_definition():
    from planner.search import Candidate, pareto_front

    rng = random.Random(5)
    cands = [Candidate(plan={}, layout={}, gpus=rng.choice([1, 2, 4, 8]), fits=True,
                       device_bytes=rng.choice([10, 20, 30, 40]) * 2**30, gpu_memory_bytes=80 * 2**30,
                       tokens_per_s=float(rng.choice([100, 200, 300, 400, 500])), step_s=1.0) for _ in range(300)]

    def dominated(a, b):
        ge = b.tokens_per_s >= a.tokens_per_s and b.gpus <= a.gpus and b.headroom_bytes >= a.headroom_bytes
        gt = b.tokens_per_s > a.tokens_per_s or b.gpus < a.gpus or b.headroom_bytes > a.headroom_bytes
        return ge and gt

    want = {id(a) for a in cands if not any(dominated(a, b) for b in cands)}
    assert {id(a) for a in pareto_front(cands)} == want and want


def test_serve_finds_the_highest_rate_within_the_goals():
    from planner.serving.rate_search import max_rate
    from planner.serving.service import serve
    from planner.serving.specs import ServeSpec, TrafficSpec

    spec, traffic = ServeSpec(model="llama-3.1-8b", gpu="h100-sxm"), TrafficSpec(requests=300)
    ans = max_rate(spec, traffic, ttft_p99=0.5, tpot_p99=0.05)
    assert ans.best is not None and ans.missed is not None and ans.best.meets and not ans.missed.meets
    assert ans.missed.rate / ans.best.rate <= 1 + ans.tolerance
    # the answer is a rate that was simulated and met the goals, as planner serve sees it
    sim = serve(spec, traffic.model_copy(update={"rate": ans.best.rate})).simulations[0]
    assert sim.ttft_s.p99 <= 0.5 and sim.tpot_s.p99 <= 0.05
    tighter = max_rate(spec, traffic, ttft_p99=0.2, tpot_p99=0.05)
    assert tighter.best is None or tighter.best.rate <= ans.best.rate  # a tighter goal never allows more


def test_serve_cli(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = main(["plan", "--serve", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--ttft-p99", "0.5",
                 "--requests", "200", "--json"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    doc = json.loads(out.getvalue())
    assert doc["best"]["meets"] and doc["best"]["ttft_p99_s"] <= 0.5
    err = io.StringIO()
    assert main(["plan", "--serve", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--ttft-p99", "-1"],
                stdout=io.StringIO(), stderr=err) == 2
    assert "ttft_p99: must be > 0" in err.getvalue()
    out = io.StringIO()
    assert main(["plan", "--serve", "--model", "llama-3.1-70b", "--gpu", "a10g", "--ttft-p99", "0.5"],
                stdout=out, stderr=io.StringIO()) == 1
    assert "DOES NOT FIT" in out.getvalue()


def test_the_schedule_can_be_pinned():
    code, out, err = _plan_cli("--gpu", "a10g", "--global-batch", "16", "--max-gpus", "4", "--pp", "2",
                               "--pp-schedule", "interleaved", "--pp-chunks", "2", "--json")
    assert code == 0, err
    best = json.loads(out)["best"]
    assert best and all(b["layout"]["pp_schedule"] == "interleaved" and b["layout"]["pp_chunks"] == 2 for b in best)
    code, out, err = _plan_cli("--gpu", "a10g", "--global-batch", "16", "--pp-schedule", "gpipe")
    assert code == 2 and "pp_schedule: must be 1f1b or interleaved" in err
