"""Layout: derived degrees and batch arithmetic, and one-line errors for layouts that cannot run."""

from __future__ import annotations

import pytest

from planner.models import load_model
from planner.engine.distributed.layout import Layout, LayoutError, layout_for_plan, make_layout


def test_derived_degrees():
    lay = Layout(gpus=64, gpus_per_node=8, tp=8, pp=4, micro_batch=2, global_batch=64)
    assert lay.dp == 2
    assert lay.grad_accum == 64 // (2 * 2)  # global / (micro x dp)
    assert lay.nodes == 8 and lay.stage == 0 and lay.chunks == 1


def test_defaults_single_node():
    lay = Layout(gpus=4)
    assert lay.per_node == 4 and lay.nodes == 1 and lay.dp == 4 and lay.grad_accum == 1 and lay.batch == 4


def test_fsdp_is_a_zero_stage():
    assert Layout(gpus=8, fsdp="full-shard").stage == 3
    assert Layout(gpus=8, fsdp="shard-grad-op").stage == 2
    assert Layout(gpus=8, zero=2).stage == 2


def test_layout_for_plan_uses_per_gpu_batch():
    lay = layout_for_plan(2, 4, gpus=16, tp=2)
    assert lay.micro_batch == 2 and lay.dp == 8 and lay.global_batch == 2 * 4 * 8 and lay.grad_accum == 4


@pytest.mark.parametrize("fields, start", [
    (dict(gpus=16, tp=3), "tp x pp = 3 x 1 = 3 does not divide the 16 GPUs"),
    (dict(gpus=16, tp=2, pp=3), "tp x pp = 2 x 3 = 6 does not divide"),
    (dict(gpus=16, micro_batch=2, global_batch=20), "global_batch: 20 is not divisible by micro_batch x dp = 2 x 16"),
    (dict(gpus=12, gpus_per_node=8), "gpus: 12 GPUs do not fill whole nodes"),
    (dict(gpus=8, sp=True), "sp: sequence parallelism"),
    (dict(gpus=8, zero=2, offload="optimizer+params"), "offload: parameters are offloaded only with ZeRO-3"),
    (dict(gpus=8, offload="optimizer"), "offload: offloading the optimizer needs ZeRO stage 1"),
    (dict(gpus=8, fsdp="full-shard", zero=2), "fsdp: give --zero (DeepSpeed) or --fsdp (torch FSDP), not both"),
    (dict(gpus=8, fsdp="full-shard", zero=3), "fsdp: give --zero (DeepSpeed) or --fsdp (torch FSDP), not both"),
    (dict(gpus=8, gpus_per_node=16), "gpus_per_node: 16 GPUs per node exceed the 8 GPUs"),
    (dict(gpus=8, zero=2, engine="torch"), "zero: torch shards gradients and parameters with FSDP: give --fsdp shard-grad-op"),
    (dict(gpus=8, fsdp="full-shard", engine="deepspeed"), "engine: --fsdp full-shard is torch FSDP"),
    (dict(gpus=8, pp=2, pp_schedule="interleaved"), "pp_chunks: the interleaved schedule needs pp_chunks >= 2"),
    (dict(gpus=8, pp_chunks=2), "pp_chunks: model chunks need pp_schedule interleaved"),
    (dict(gpus=8, pp=4, pp_schedule="interleaved", pp_chunks=2, global_batch=2), "global_batch: the interleaved"),
    (dict(gpus=8, zero=4), "zero: "),
])
def test_layout_errors_are_one_line(fields, start):
    with pytest.raises(LayoutError) as e:
        make_layout(**fields)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(start), msg


@pytest.mark.parametrize("model, fields, start", [
    ("llama-3.1-8b", dict(gpus=48, tp=3), "tp: 3 does not divide the 32 attention heads of llama-3.1-8b"),
    ("llama-3.1-8b", dict(gpus=16, tp=16), "tp: 16 does not divide the 8 KV heads of llama-3.1-8b"),
    ("llama-3.2-1b", dict(gpus=32, pp=32), "pp: 32 stages exceed the 16 layers of llama-3.2-1b"),
    ("llama-3.2-1b", dict(gpus=16, pp=8, pp_schedule="interleaved", pp_chunks=4, global_batch=16),
     "pp_chunks: pp x pp_chunks = 32 chunks exceed the 16 layers"),
])
def test_model_errors(model, fields, start):
    with pytest.raises(LayoutError) as e:
        make_layout(**fields).check_model(load_model(model))
    assert "\n" not in str(e.value) and str(e.value).startswith(start), str(e.value)


def test_valid_model_layout_passes():
    make_layout(gpus=16, gpus_per_node=8, zero=3, tp=2).check_model(load_model("llama-3.1-70b"))
