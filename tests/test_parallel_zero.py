"""ZeRO model states: the paper's Table 1, DeepSpeed's estimators, and our plans under TP/PP/ZeRO.

The reference figures are in tests/data (copies of shared/reference); every expected value is
computed here from the model, never copied into the code under test."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from planner.models import load_model
from planner.engine.distributed.layout import Layout
from planner.engine.distributed.shard import rank_spec, stage_layers
from planner.engine.distributed.zero import (
    StateBytes, deepspeed_zero2, deepspeed_zero3, partition, plan_states, rank_model_states, zero_paper_bytes,
)
from planner.specs import Plan

DATA = Path(__file__).parent / "data"
STAGE = {"os": 1, "os+g": 2, "os+g+p": 3}
GiB = 2**30


def _rows(name: str) -> list[dict]:
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f))


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


@pytest.mark.parametrize("row", _rows("zero_model_states.csv"), ids=lambda r: f"{r['params']}-{r['nd']}-{r['stage']}")
def test_zero_paper_table1(row):
    """Within 1%, or within the table's own rounding (half a unit of its last printed digit: the
    paper prints 0.12 GB for 16 x 7.5e9 / 1024 = 0.117 GB)."""
    got = zero_paper_bytes(float(row["params"]), int(row["nd"]), STAGE[row["stage"]]) / 1e9
    want = float(row["gb_per_device"])
    rounding = 0.5 * 10 ** -_decimals(row["gb_per_device"])
    assert abs(got - want) <= max(0.01 * want, rounding), (got, want)


def _ds(row: dict):
    p = float(row["params"])
    n, nodes = int(row["gpus_per_node"]), int(row["nodes"])
    off_opt = row["offload_optimizer"] == "cpu"
    if row["stage"] == "2":
        return deepspeed_zero2(p, n, nodes, offload_optimizer=off_opt)
    return deepspeed_zero3(p, float(row["largest_layer_params"]), n, nodes, offload_optimizer=off_opt,
                           offload_params=row["offload_param"] == "cpu", zero_init=row["zero_init"] == "1")


@pytest.mark.parametrize("row", _rows("deepspeed_estimators.csv"),
                         ids=lambda r: f"z{r['stage']}-param_{r['offload_param']}-opt_{r['offload_optimizer']}-init{r['zero_init']}")
def test_deepspeed_estimators(row):
    fig = _ds(row)
    gpu, cpu = fig.gpu_bytes / GiB, fig.cpu_bytes / GiB
    assert gpu == pytest.approx(float(row["gpu_gib_per_device"]), rel=0.02)
    assert cpu == pytest.approx(float(row["cpu_gib"]), rel=0.02)


def test_deepspeed_docs_zero2_figure_is_the_legacy_formula():
    """memory.rst prints 15.93 GB for ZeRO-2 without offload: the older 4P + 16P/N."""
    assert deepspeed_zero2(2851e6, 8, 1, legacy=True).gpu_bytes / GiB == pytest.approx(15.93, rel=0.01)


@pytest.mark.parametrize("stage, offload_opt, offload_params", [
    (2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)])
def test_deepspeed_semantics_match_deepspeed_gpu_formulas(stage, offload_opt, offload_params):
    """Our plan pricing under DeepSpeed semantics gives DeepSpeed's own GPU formulas for a full
    bf16 model with AdamW (P = all params, LL = the largest single module)."""
    spec = load_model("llama-3.2-1b")
    plan = Plan(model=spec.id, precision="bf16", optimizer="adamw-fused")
    offload = "optimizer+params" if offload_params else ("optimizer" if offload_opt else "none")
    lay = Layout(gpus=8, zero=stage, offload=offload)
    got = rank_model_states(spec, plan, lay).gpu_total
    p = spec.num_params
    fused_steps = plan_states(spec, Plan(model=spec.id, precision="fp32", optimizer="adamw-fused"),
                              Layout(gpus=8)).optimizer - 8 * p  # adamw-fused's GPU step counters
    if stage == 2:
        want = deepspeed_zero2(p, 8, 1, offload_optimizer=offload_opt).gpu_bytes
    else:
        ll = max([lin.in_features * lin.out_features for lin in spec.layer_linears] + [spec.embedding_params])
        want = deepspeed_zero3(p, ll, 8, 1, offload_optimizer=offload_opt, offload_params=offload_params).gpu_bytes
    extra = 0 if offload_opt else fused_steps / 8
    assert got == pytest.approx(want + extra, rel=1e-6)


def test_partition_rules():
    s = StateBytes(params_trainable=2, grads=2, optimizer=12)
    assert partition(s, 0, 4).gpu_total == 16
    assert partition(s, 1, 4).gpu_total == 2 + 2 + 3
    assert partition(s, 2, 4).gpu_total == 2 + 14 / 4
    assert partition(s, 3, 4).gpu_total == 4
    off = partition(s, 3, 4, offload_optimizer=True, offload_params=True)
    assert off.gpu_total == 0 and off.cpu_total == 4


def test_tp_pp_shares_add_up_to_the_model():
    """Summed over the TP ranks and the pipeline stages, the shares are the model (+ what is
    replicated: norms, row-parallel biases, position embeddings; + the tied head's copy with pp > 1)."""
    for model in ("llama-3.1-8b", "gpt2"):
        spec = load_model(model)
        for tp, pp in ((1, 4), (2, 1), (4, 3)):
            total = 0
            for st in range(pp):
                part = rank_spec(spec, tp, pp, st)
                assert part.num_layers == stage_layers(spec.num_layers, pp, st)
                total += part.num_params * tp
            replicated = (tp - 1) * (
                spec.num_layers * (spec.layer_norm_params + sum(l.out_features for l in spec.layer_linears
                                                                  if l.bias and l.name in ("o_proj", "c_proj", "down_proj")))
                + spec.final_norm_params + spec.position_embedding_params)
            vocab_pad = (-(-spec.vocab_size // tp) * tp - spec.vocab_size) * spec.hidden_size
            heads = (1 + (spec.lm_head_params > 0)) if not (spec.tie_word_embeddings and pp > 1) else 2
            assert total == spec.num_params + replicated + vocab_pad * heads + (
                spec.embedding_params if spec.tie_word_embeddings and pp > 1 else 0), (model, tp, pp)


def test_busiest_pp_stage_holds_embeddings_or_head():
    spec = load_model("llama-3.1-8b")
    first, last = rank_spec(spec, 1, 4, 0), rank_spec(spec, 1, 4, 3)
    assert first.embedding_params == spec.embedding_params and first.lm_head_params == 0
    assert last.lm_head_params == spec.lm_head_params and last.embedding_params == 0
    assert first.num_layers == last.num_layers == 8


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_plans_partition_only_what_zero_partitions(method):
    spec = load_model("llama-3.1-8b")
    plan = Plan(model=spec.id, method=method)
    z0 = rank_model_states(spec, plan, Layout(gpus=8))
    z1 = rank_model_states(spec, plan, Layout(gpus=8, zero=1))
    z3 = rank_model_states(spec, plan, Layout(gpus=8, fsdp="full-shard"))
    if method == "full":
        assert z1.gpu["optimizer_states"] < z0.gpu["optimizer_states"]
    # ZeRO-3 / FSDP shards frozen weights too (QLoRA's 4-bit ones as stored)
    assert z3.gpu["parameters"] == pytest.approx(z0.gpu["parameters"] / 8, rel=1e-9)
    assert z3.gpu["optimizer_states"] == pytest.approx(z0.gpu["optimizer_states"] / 8, rel=1e-9)
    assert z3.gpu["gathered"] > 0
    # optimizer states exist only for the trainable parameters (LoRA adapters: tiny)
    if method != "full":
        assert z0.gpu["optimizer_states"] < 0.1 * z0.gpu["parameters"]


def test_offload_moves_states_to_cpu_per_rank():
    spec = load_model("llama-3.1-8b")
    plan = Plan(model=spec.id)
    st = rank_model_states(spec, plan, Layout(gpus=8, zero=3, offload="optimizer+params"))
    assert set(st.cpu) == {"optimizer_states", "parameters"} and "gathered" in st.gpu
    p = spec.num_params
    # DeepSpeed: 2 B half params + 4 master + 8 Adam + 4 fp32 grads per parameter, over 8 ranks
    assert st.cpu_total == pytest.approx((2 + 4 + 8 + 4) * p / 8, rel=0.001)
