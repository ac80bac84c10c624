"""The engine's op list of a step equals the one the dry run records from the real program.

For every built-in technique on a tiny llama (and the sft and generate variants the time model
distinguishes), the op counts per kind and the FLOPs per kind of one steady-state step, as
planner.engine.program lists them, equal what planner.backends.dryrun.ops.OpRecorder records while
the technique's own step function runs on fake tensors. sft and generate are compared phase by
phase; the techniques per step (their step functions mark phases their own way: DPO's loss ops run
inside its "reference" phase, for instance)."""

from __future__ import annotations

import collections
import json

import pytest

pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")

from planner.backends.dryrun.ops import OpRecorder  # noqa: E402
from planner.backends.tracked import run_tracked  # noqa: E402
from planner.engine.timing import _program  # noqa: E402
from planner.models import load_model, model_config  # noqa: E402
from planner.plugins import technique  # noqa: E402
from planner.specs import Plan  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(TINY))
    return str(d / "config.json")


def recorded(plan: Plan) -> tuple[dict, dict]:
    """(counts, FLOPs) per (phase, kind) of the last recorded step; the harness's randint (making the
    batch) is not the program's."""
    r = OpRecorder()
    run_tracked(technique(plan.task), plan, model_config(plan.model), steps=2, device="fake", record_ops=r)
    last = max(x.step for x in r.records)
    counts, flops = collections.Counter(), collections.Counter()
    for x in r.records:
        if x.step == last and "randint" not in x.name:
            counts[(x.phase, x.kind)] += 1
            flops[(x.phase, x.kind)] += x.flops
    return counts, flops


def engine(plan: Plan) -> tuple[dict, dict]:
    """The same from the engine's programs: each part of each phase at the sizes the time model
    prices it with (a decode step at the mean context, which makes its linear terms exact)."""
    w = technique(plan.task).workload(plan, load_model(plan.model))
    counts, flops = collections.Counter(), collections.Counter()
    for ph in w.phases:
        prog = _program(ph, w)
        steps = max(ph.new_tokens - 1, 0)
        for part, stretches in prog.phases.items():
            decode = part == "decode"
            tokens, seq = (ph.batch, ph.seq + ph.new_tokens / 2) if decode else (ph.batch * ph.seq, ph.seq)
            name = part if plan.task in ("sft", "generate") else "step"
            for s in stretches:
                reps = s.repeat * ((steps - s.fewer) if decode else 1)
                t = ph.batch if s.per_sequence else tokens
                for op in s.ops.ops:
                    counts[(name, op.kind)] += op.count * reps
                    f = float(op.flops.at(t, seq))
                    if f:
                        flops[(name, op.kind)] += op.count * reps * f
    return counts, flops


def _by_step(c: dict) -> dict:
    out: dict = collections.Counter()
    for (_, kind), v in c.items():
        out[("step", kind)] += v
    return out


CASES = {
    "sft full bf16": dict(seq=16),
    "sft lora": dict(seq=16, method="lora"),
    "sft checkpointing": dict(seq=16, grad_ckpt=True),
    "sft lora checkpointing": dict(seq=16, method="lora", grad_ckpt=True),
    "sft mixed-bf16": dict(seq=16, precision="mixed-bf16"),
    "sft fp32": dict(seq=16, precision="fp32"),
    "generate": dict(task="generate", prompt_len=8, new_tokens=4),
    "rm": dict(task="rm", seq=16),
    # LoRA: peft's trained copy of `score` in the model's dtype beside the fp32 adapters: two dtype
    # groups in AdamW's foreach kernels
    "rm lora": dict(task="rm", seq=16, method="lora"),
    "dpo": dict(task="dpo", seq=16),
    "distill": dict(task="distill", seq=16, teacher="TINY"),
    "grpo": dict(task="grpo", group_size=2, prompt_len=8, new_tokens=4),
    "ppo": dict(task="ppo", reward_model="TINY", prompt_len=8, new_tokens=4),
    # one sequence: transformers skips the mask's position-id expand, the loss's label copy and
    # generate's right-padding check
    "sft one sequence": dict(seq=16, batch=1),
    # gradient accumulation: every phase per micro-batch, the later ones' AccumulateGrad an add_
    "sft gradient accumulation": dict(seq=16, grad_accum=2),
    "sft lora ckpt gradient accumulation": dict(seq=16, method="lora", grad_ckpt=True, grad_accum=3),
    "rm gradient accumulation": dict(task="rm", seq=16, grad_accum=2),
    "dpo gradient accumulation": dict(task="dpo", seq=16, grad_accum=2, reference_pass="before"),
    "distill gradient accumulation": dict(task="distill", seq=16, teacher="TINY", grad_accum=2),
    "generate one sequence": dict(task="generate", prompt_len=8, new_tokens=4, batch=1),
    # eager attention: its causal mask in every forward, repeat_kv, the batched matmuls' reshapes (a
    # decode step's q and output views, one sequence's q a view), the fp32 softmax; autocast's casts
    "sft eager": dict(seq=16, attn="eager"),
    "sft eager mixed-bf16 checkpointing": dict(seq=16, attn="eager", precision="mixed-bf16", grad_ckpt=True),
    "sft eager one sequence": dict(seq=16, attn="eager", batch=1),
    "generate eager": dict(task="generate", prompt_len=8, new_tokens=4, attn="eager"),
    "dpo eager": dict(task="dpo", seq=16, attn="eager"),
    "distill one sequence": dict(task="distill", seq=16, teacher="TINY", batch=1),  # the teacher's forward too
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_op_list_equals_the_programs(name, tiny):
    kw = {k: (tiny if v == "TINY" else v) for k, v in CASES[name].items()}
    plan = Plan(**{"model": tiny, "batch": 2, **kw})
    rc, rf = recorded(plan)
    ec, ef = engine(plan)
    if plan.task not in ("sft", "generate"):
        rc, rf = _by_step(rc), _by_step(rf)
    assert {k: v for k, v in ec.items() if v} == {k: v for k, v in rc.items() if v}
    assert set(ef) == {k for k, v in rf.items() if v}
    for key, v in rf.items():
        if v:
            assert ef[key] == pytest.approx(v, rel=1e-9), key


def test_a_wrong_op_list_is_caught(tiny):
    """The comparison can fail: one fewer layer in the engine's program changes the counts."""
    plan = Plan(model=tiny, batch=2, seq=16)
    rc, _ = recorded(plan)
    ec, _ = engine(plan.model_copy(update={"model": tiny}))
    ec[("forward", "matmul")] -= 1
    assert {k: v for k, v in ec.items() if v} != {k: v for k, v in rc.items() if v}
