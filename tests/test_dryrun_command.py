"""`planner dryrun`: a user's own step, dry-run on fake tensors, equals the same code on real CPU tensors
byte for byte; a built-in technique's step through it equals `planner validate --backend dry-run`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from planner.cli import main  # noqa: E402
from planner.dryrun import DryrunError, measure  # noqa: E402
from planner.specs import Plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "models" / "tiny-llama")
STEPS = ROOT / "examples" / "steps"

EXAMPLES = [
    ("dpo_loop.py:trl_order", dict(task="dpo", batch=2, seq=32)),
    ("dpo_loop.py:both_forwards_first", dict(task="dpo", batch=2, seq=32)),
    ("distill_loss.py:step", dict(task="distill", teacher=TINY, batch=2, seq=32)),
    ("accumulation_loop.py:step", dict(batch=8, seq=32)),
]


def _plan(**fields) -> Plan:
    return Plan(model=TINY, **fields)


@pytest.mark.parametrize("ref,fields", EXAMPLES)
def test_examples_dry_run_equals_the_real_cpu_run(ref, fields):
    plan = _plan(**fields)
    fake = measure(str(STEPS / ref), plan, steps=2, device="fake", estimate=False)
    real = measure(str(STEPS / ref), plan, steps=2, device="cpu", estimate=False)
    assert fake.peak_allocated_bytes == real.peak_allocated_bytes > 0
    assert fake.breakdown == real.breakdown
    assert fake.phases == real.phases and fake.peak_phase == real.peak_phase
    assert fake.reserved_bytes == real.reserved_bytes


def test_the_loop_order_decides_the_peak():
    plan = _plan(task="dpo", batch=2, seq=32)
    trl = measure(str(STEPS / "dpo_loop.py:trl_order"), plan, estimate=False)
    both = measure(str(STEPS / "dpo_loop.py:both_forwards_first"), plan, estimate=False)
    logits = 2 * plan.batch * plan.seq * 256 * 2  # one (2B, S, V) bf16 logits tensor of the tiny model
    assert both.peak_allocated_bytes - trl.peak_allocated_bytes >= logits


@pytest.mark.parametrize("fields", [
    dict(task="sft", batch=2, seq=32, grad_accum=2),
    dict(task="sft", method="lora", batch=2, seq=32, grad_ckpt=True),
    dict(task="dpo", batch=2, seq=32),
    dict(task="rm", batch=2, seq=32),
    dict(task="distill", teacher=TINY, batch=2, seq=32),
    dict(task="generate", batch=2, prompt_len=16, new_tokens=4),
    dict(task="grpo", batch=1, group_size=2, prompt_len=16, new_tokens=4),
    dict(task="ppo", reward_model=TINY, batch=2, prompt_len=16, new_tokens=4),
])
def test_a_builtin_technique_through_dryrun_equals_validate(fields):
    from planner.backends import run_backend
    from planner.plugins import technique

    plan = _plan(**fields)
    ours = measure(technique(plan.task).step, plan, steps=2, estimate=False)
    theirs = run_backend("dry-run", plan, steps=2)
    assert ours.peak_allocated_bytes == theirs.peak_allocated_bytes
    assert ours.breakdown == theirs.breakdown
    assert ours.phases == theirs.phases


def test_cli_prints_the_figures_and_the_estimate(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = main(["dryrun", str(STEPS / "accumulation_loop.py:step"), "--model", TINY, "--batch", "8", "--seq", "32",
                 "--json"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    doc = json.loads(out.getvalue())
    assert doc["signature"] == "step(model, optimizer, batch)" and doc["peak_allocated_bytes"] > 0
    assert doc["estimate_peak_allocated_bytes"] > 0 and doc["difference"] is not None
    assert set(doc["phases"]) >= {"forward", "backward", "optimizer"}
    assert doc["peak_op"]


def _step_file(tmp_path: Path, body: str) -> str:
    f = tmp_path / "my_step.py"
    f.write_text(body)
    return str(f)


@pytest.mark.parametrize("body,ref_tail,message", [
    (None, "missing.py:step", "step: no such file"),
    ("def step(model, optimizer, batch):\n    pass\n", ":stpe", "has no function 'stpe' (did you mean: step?)"),
    ("def step(a, b):\n    pass\n", ":step", "step: step(a, b) must take (ctx) or (model, optimizer, batch)"),
    ("def step(model, optimizer, batch):\n    x = 1\n    raise ValueError('my bad')\n", ":step",
     "my_step.py:3: ValueError while running the step: my bad"),
    ("def step(model, optimizer, batch):\n    return None\n", ":step", "allocated nothing"),
    ("import nonexistent_module_xyz\n", ":step", "my_step.py:1: ModuleNotFoundError while importing it"),
])
def test_bad_steps_are_one_line_errors(tmp_path, body, ref_tail, message):
    ref = str(tmp_path / ref_tail) if body is None else _step_file(tmp_path, body) + ref_tail
    out, err = io.StringIO(), io.StringIO()
    code = main(["dryrun", ref, "--model", TINY, "--batch", "2", "--seq", "16"], stdout=out, stderr=err)
    assert code == 2
    assert message in err.getvalue() and err.getvalue().count("\n") == 1, err.getvalue()
    assert out.getvalue() == ""


def test_a_plain_step_needs_a_one_model_task(tmp_path):
    ref = _step_file(tmp_path, "def step(model, optimizer, batch):\n    model(**batch).loss.backward()\n") + ":step"
    with pytest.raises(DryrunError, match="task dpo has policy, reference: write step\\(ctx\\)"):
        measure(ref, _plan(task="dpo", batch=2, seq=16))
