"""The estimate against dry runs of the real programs (transformers + peft + bitsandbytes on fake
tensors, at full scale). The `smoke` suite runs in CI; the `dry-run` suite (>= 24 cases, minutes)
is marked slow and writes reports/validation/dry-run.md and .csv.

Targets (the core issue): peak allocated within 2% median and 5% worst; every category within 5% or
64 MiB.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from planner.suites import suite  # noqa: E402
from planner.validate import CATEGORY_TOLERANCE_ABS, CATEGORY_TOLERANCE_REL, compare, describe, run_suite, summary  # noqa: E402

REPORTS = Path(__file__).resolve().parents[1] / "reports" / "validation"


@pytest.mark.parametrize("plan", suite("smoke"), ids=describe)
def test_smoke_estimate_matches_dry_run(plan):
    row = compare(plan)
    assert abs(row["peak_err_pct"]) <= 2.0, row
    for cat in ("parameters", "gradients", "activations", "optimizer_states", "temporaries", "kv_cache"):
        est, meas = row[f"est_{cat}"], row[f"meas_{cat}"]
        assert abs(est - meas) <= max(CATEGORY_TOLERANCE_REL * meas, CATEGORY_TOLERANCE_ABS), (cat, est, meas)


@pytest.mark.slow
def test_dry_run_suite_meets_the_accuracy_targets():
    rows = run_suite("dry-run", REPORTS)
    s = summary(rows)
    assert s["cases"] >= 24
    assert s["median_abs_err_pct"] <= 2.0, s
    assert s["worst_abs_err_pct"] <= 5.0, s
    assert s["categories_ok"] == s["cases"], [r["case"] + ": " + r["category_misses"] for r in rows if not r["categories_ok"]]
