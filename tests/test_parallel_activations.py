"""Activation memory per rank: Korthikanti et al.'s formulas, pipeline in-flight counts, and the
engine-based scaling to TP/SP/PP."""

from __future__ import annotations

import pytest

from planner.gpus import load_gpu
from planner.models import load_model
from planner.engine.distributed import activations as act
from planner.engine.distributed import estimate_distributed
from planner.engine.distributed.ranks import _activations
from planner.engine.distributed.layout import Layout, layout_for_plan
from planner.specs import Plan

# GPT-3 175B shape (Korthikanti et al. Table 3): a=96, h=12288, s=2048, b=1, t=8
S, B, H, A, T = 2048, 1, 12288, 96, 8
SBH = S * B * H


def test_korthikanti_table2():
    core = 5 * A * S / H
    assert act.korthikanti_layer_bytes(S, B, H, A) == SBH * (34 + core)
    assert act.korthikanti_layer_bytes(S, B, H, A, T) == pytest.approx(SBH * (10 + 24 / T + core / T))
    assert act.korthikanti_layer_bytes(S, B, H, A, T, sp=True) == pytest.approx(SBH / T * (34 + core))
    assert act.korthikanti_layer_bytes(S, B, H, A, T, recompute="selective") == pytest.approx(SBH * (10 + 24 / T))
    assert act.korthikanti_layer_bytes(S, B, H, A, T, sp=True, recompute="selective") == pytest.approx(34 * SBH / T)
    assert act.korthikanti_layer_bytes(S, B, H, A, T, recompute="full") == 2 * SBH


def test_tp_plus_sp_is_no_parallelism_over_t():
    for t in (2, 4, 8):
        assert act.korthikanti_layer_bytes(S, B, H, A, t, sp=True) == pytest.approx(
            act.korthikanti_layer_bytes(S, B, H, A) / t)


def test_first_stage_holds_all_layers_and_the_interleaving_factor():
    L, p, m = 96, 8, 64
    one = act.korthikanti_layer_bytes(S, B, H, A, T, sp=True)
    assert act.korthikanti_stage_bytes(S, B, H, A, L, T, True, pp=p, micro_batches=m) == pytest.approx(one * L)
    for v in (2, 3, 4):
        got = act.korthikanti_stage_bytes(S, B, H, A, L, T, True, pp=p, micro_batches=m, chunks=v)
        assert got == pytest.approx(one * L * act.interleave_factor(p, v))
        assert act.interleave_factor(p, v) == 1 + (p - 1) / (p * v)


def test_in_flight_counts():
    assert [act.in_flight(4, k, 16) for k in range(4)] == [4, 3, 2, 1]
    assert act.in_flight(4, 0, 2) == 2  # fewer micro-batches than stages
    assert act.in_flight(1, 0, 8) == 1


def test_scale_single_gpu_reproduces_korthikanti_tp():
    L = 96
    core = 5 * A * S / H
    single = act.korthikanti_layer_bytes(S, B, H, A) * L
    frac = 10 / (34 + core)  # the part outside the TP regions
    got = act.scale_single_gpu(single, L, tp=T, replicated_fraction=frac)
    assert got == pytest.approx(act.korthikanti_layer_bytes(S, B, H, A, T) * L)
    assert act.scale_single_gpu(single, L, tp=T, sp=True, replicated_fraction=frac) == pytest.approx(single / T)
    # pipeline: stage 0 of 8 with 16 micro-batches keeps L/8 layers x 8 micro-batches
    assert act.scale_single_gpu(single, L, replicated_fraction=frac, pp=8, micro_batches=16) == pytest.approx(single)
    assert act.scale_single_gpu(single, L, replicated_fraction=frac, pp=8, stage=7, micro_batches=16) == pytest.approx(single / 8)


def _kept(spec, plan, **fields):
    lay = layout_for_plan(plan.batch, plan.grad_accum, **fields)
    return _activations(spec, plan, lay, 0, "engine")


def test_engine_activations_scale_with_tp_and_sp():
    spec = load_model("llama-3.1-8b")
    plan = Plan(model=spec.id, batch=1, seq=2048)
    one = _kept(spec, plan, gpus=1)["activations"]
    tp = _kept(spec, plan, gpus=4, tp=4)["activations"]
    sp = _kept(spec, plan, gpus=4, tp=4, sp=True)["activations"]
    # TP divides the attention/MLP part only: between 1/t and 1 of the single-GPU figure
    assert one / 4 < tp < one
    assert sp == pytest.approx(one / 4, rel=1e-3)  # all but the rotary tables, which stay whole
    # the replicated share of a llama layer (norm inputs, fp32 norm internals, residual stream)
    replicated = (tp - one / 4) / (one * (1 - 1 / 4))
    assert 0.1 < replicated < 0.6


def test_engine_checkpointing_keeps_layer_inputs():
    spec = load_model("llama-3.1-8b")
    plan = Plan(model=spec.id, batch=2, seq=1024, grad_ckpt=True)
    a = _kept(spec, plan, gpus=2, tp=2)
    # inputs of every layer (bf16 residual stream, replicated without SP) + the rotary tables
    assert a["activations"] >= spec.num_layers * 2 * 1024 * spec.hidden_size * 2
    assert a["activations"] < spec.num_layers * 2 * 1024 * spec.hidden_size * 2 * 1.2
    b = _kept(spec, plan, gpus=2, tp=2, sp=True)
    assert b["activations"] < a["activations"]


def test_engine_single_rank_close_to_the_engine():
    """With no parallelism the rank's activations are the engine's: kept by all layers + head."""
    from planner.engine import estimate

    spec = load_model("llama-3.2-1b")
    gpu = load_gpu("h100-sxm")
    plan = Plan(model=spec.id, batch=2, seq=1024)
    single = estimate(plan, spec, gpu)
    dist = estimate_distributed(plan, Layout(gpus=1, micro_batch=2), spec, gpu)
    assert dist.memory.peak_allocated_bytes == pytest.approx(single.peak_allocated_bytes, rel=0.10)


def test_pipeline_first_stage_keeps_more_micro_batches():
    spec = load_model("llama-3.1-8b")
    plan = Plan(model=spec.id, batch=1, seq=2048)
    lay = Layout(gpus=4, pp=4, micro_batch=1, global_batch=8)
    first = _activations(spec, plan, lay, 0, "engine")["activations"]
    last = _activations(spec, plan, lay, 3, "engine")["activations"]
    assert first == pytest.approx(4 * last, rel=0.02)
