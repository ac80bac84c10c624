"""Slow: full-scale dry runs of measured H200 steps, their simulated reserved against the
measurement (reports/validation/allocator.csv holds the measured figures of
shared/reference/h200_measured_steps.csv; scripts/allocator_validation.py regenerates it)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed (the backends extra)")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra)")

from planner.backends import allocation  # noqa: E402
from planner.backends.dryrun._run import dry_run_impl  # noqa: E402
from planner.engine.allocator import replay  # noqa: E402
from planner.models import model_config  # noqa: E402
from planner.specs import Plan  # noqa: E402

TABLE = Path(__file__).resolve().parents[1] / "reports" / "validation" / "allocator.csv"
ROWS = {  # CSV row -> the plan it measured
    4: dict(model="qwen2.5-0.5b", batch=4, seq=2048, grad_ckpt=True),
    12: dict(model="llama-3.2-1b", method="lora", lora_rank=16, batch=4, seq=2048, grad_ckpt=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(ROWS))
def test_reserved_of_measured_h200_steps(row):
    with TABLE.open() as f:
        measured = {int(r["row"]): int(r["measured_reserved"]) for r in csv.DictReader(f)}
    plan = Plan(**ROWS[row], gpu="h200")
    # rows after the first: the measuring process had allocated its cuBLAS workspace before
    trace = allocation.trace_options(plan, warm_process=True)
    r = dry_run_impl(plan, model_config(plan.model), steps=3, device="fake", trace=trace)
    reserved = replay(r.allocation_trace).peak_reserved_bytes
    assert abs(reserved / measured[row] - 1) < 0.01
