"""Collective volumes against the published formulas, and bandwidths from the catalog's
both-directions figures."""

from __future__ import annotations

import pytest

from planner.gpus import load_gpu
from planner.models import load_model
from planner.engine.distributed import comm
from planner.engine.distributed import estimate_distributed
from planner.engine.distributed.layout import Layout, layout_for_plan
from planner.specs import Plan

PSI = 7.5e9


def test_ring_factors():
    assert comm.bus_factor("all-reduce", 8) == 2 * 7 / 8
    assert comm.bus_factor("reduce-scatter", 8) == comm.bus_factor("all-gather", 8) == 7 / 8
    assert comm.bus_factor("all-reduce", 1) == 0
    assert comm.bus_factor("send/recv", 2) == 1


def test_published_volumes_in_elements():
    n = 1024  # (n-1)/n -> 1: the ZeRO paper's 2Ψ and 3Ψ
    assert comm.dp_allreduce_elements(PSI, n) == pytest.approx(2 * PSI, rel=1e-3)
    assert comm.zero_elements(PSI, n, 1) == comm.zero_elements(PSI, n, 2) == pytest.approx(2 * PSI, rel=1e-3)
    assert comm.zero_elements(PSI, n, 3) == pytest.approx(3 * PSI, rel=1e-3)
    b, s, h, t = 1, 2048, 12288, 8
    assert comm.tp_layer_elements(b, s, h, t) == pytest.approx(8 * b * s * h * (t - 1) / t)
    assert comm.pp_elements(b, s, h) == b * s * h


def test_bandwidth_is_half_the_both_directions_figure():
    h100 = load_gpu("h100-sxm")  # NVLink 4: 900 GB/s both directions
    topo = comm.topology(Layout(gpus=8), h100)
    assert topo.intra_bytes_per_s == 450e9
    assert topo.inter_bytes_per_s == 400 / 8 * 1e9  # 400 Gb/s NIC per GPU
    l40s = load_gpu("l40s")  # PCIe 4.0 x16: 64 GB/s both directions
    assert comm.topology(Layout(gpus=8), l40s).intra_bytes_per_s == 32e9


def test_groups_follow_megatron_rank_order():
    g = comm.groups(Layout(gpus=64, gpus_per_node=8, tp=8, pp=2))
    assert g["tp"].size == 8 and not g["tp"].spans_nodes
    assert g["dp"].size == 4 and g["dp"].per_node == 1  # one DP member per node: stride 8
    assert g["pp"].spans_nodes
    g = comm.groups(Layout(gpus=16, gpus_per_node=8, tp=2))
    assert g["dp"].size == 8 and g["dp"].per_node == 4
    g = comm.groups(Layout(gpus=8, gpus_per_node=8, tp=2, pp=2))
    assert not g["dp"].spans_nodes and not g["pp"].spans_nodes


def test_cross_node_bandwidth_is_nics_in_parallel():
    topo = comm.topology(Layout(gpus=16, gpus_per_node=8), load_gpu("h100-sxm"))
    one = comm.bus_bandwidth(comm.Group("dp", 2, 1), topo)
    four = comm.bus_bandwidth(comm.Group("dp", 8, 4), topo)
    eight = comm.bus_bandwidth(comm.Group("dp", 16, 8), topo)
    assert four == pytest.approx(4 * one)
    assert eight == pytest.approx(min(450e9 * comm.LINK_EFFICIENCY["intra"], 8 * one))


def _plan_layout(spec, **fields):
    plan = Plan(model=spec.id, batch=1, seq=2048)
    return plan, layout_for_plan(1, 1, **fields)


@pytest.mark.parametrize("zero, factor", [(0, 2), (1, 2), (2, 2), (3, 3)])
def test_estimate_dp_volume_matches_zero_paper(zero, factor):
    """Per-step DP/ZeRO volume per rank = factor · Ψ · (n−1)/n elements × 2 bytes (bf16)."""
    spec = load_model("llama-3.2-1b")
    n = 8
    plan, lay = _plan_layout(spec, gpus=n, zero=zero)
    est = estimate_distributed(plan, lay, spec, load_gpu("h100-sxm"))
    dp = [c for c in est.collectives if c.group == "dp"]
    got = sum(c.bytes_per_rank for c in dp)
    assert got == pytest.approx(factor * spec.num_params * (n - 1) / n * 2, rel=1e-9)
    assert all(c.overlapped for c in dp if "after step" not in c.name)


def test_estimate_tp_and_pp_volumes():
    spec = load_model("llama-3.1-8b")
    b, s, h, t, pp, m = 1, 2048, spec.hidden_size, 4, 2, 8
    plan = Plan(model=spec.id, batch=b, seq=s)
    lay = Layout(gpus=t * pp, gpus_per_node=8, tp=t, pp=pp, micro_batch=b, global_batch=m * b)
    est = estimate_distributed(plan, lay, spec, load_gpu("h100-sxm"))
    tp = next(c for c in est.collectives if c.group == "tp")
    layers = spec.num_layers // pp
    ends = m  # one vocab-parallel all-reduce per micro-batch at the embedding or the head
    per_layer_mb = (tp.bytes_per_rank - ends * 2 * (t - 1) / t * b * s * h * 2) / (layers * m)
    assert per_layer_mb == pytest.approx(8 * b * s * h * (t - 1) / t * 2)  # 8bsh(t-1)/t elements, bf16
    assert not tp.overlapped and tp.exposed_s == tp.time_s
    p2p = next(c for c in est.collectives if c.group == "pp")
    assert p2p.tensor_bytes == b * s * h * 2 / t  # bsh per boundary, scatter/gather over the TP ranks
    assert p2p.count == 2 * m and not p2p.overlapped


def test_recompute_adds_two_tp_all_reduces_per_layer():
    spec = load_model("llama-3.1-8b")
    base = dict(gpus=2, tp=2)
    counts = []
    for ckpt in (False, True):
        plan = Plan(model=spec.id, batch=1, seq=1024, grad_ckpt=ckpt)
        est = estimate_distributed(plan, layout_for_plan(1, 1, **base), spec, load_gpu("h100-sxm"))
        counts.append(next(c for c in est.collectives if c.group == "tp").count)
    assert counts[1] - counts[0] == 2 * spec.num_layers


def test_sequence_parallel_moves_the_same_bytes():
    spec = load_model("llama-3.1-8b")
    plan = Plan(model=spec.id, batch=1, seq=2048)
    gpu = load_gpu("h100-sxm")
    ar = estimate_distributed(plan, layout_for_plan(1, 1, gpus=4, tp=4), spec, gpu)
    sp = estimate_distributed(plan, layout_for_plan(1, 1, gpus=4, tp=4, sp=True), spec, gpu)
    v_ar = sum(c.bytes_per_rank for c in ar.collectives if c.group == "tp")
    v_sp = sum(c.bytes_per_rank for c in sp.collectives if c.group == "tp")
    assert v_sp == pytest.approx(v_ar)
