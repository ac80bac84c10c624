"""The CPU time validation (planner.backends.time_validation): its machinery runs end to end on a
smoke suite (three tiny cases, two interleaved rounds, the quick calibration) and produces the
table with its columns, the CSV and the diagnostics. Behaviour only: no assertion on wall time or
on the size of the errors."""

from __future__ import annotations

import csv
import io
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from planner.backends import time_validation as tv  # noqa: E402
from planner.backends.step_programs import CHEAP_SAMPLES, Case, time_cases  # noqa: E402
from planner.engine.timing import step_seconds  # noqa: E402

TABLE_HEADER = ("| case | measured ms | quietest ms | median ms | spread | IQR | predicted ms | error | error vs quietest | "
                "error vs median | compute ms | host ms | host share | op list |")


@pytest.fixture(scope="module")
def suite():
    return tv.run_suite("smoke", rounds=2, quick_calibration=True)


def test_every_case_is_timed_predicted_and_diagnosed(suite):
    assert len(suite.rows) == len(tv.SMOKE) == 3
    assert any(len(r.case.samples) == 2 * CHEAP_SAMPLES for r in suite.rows)  # the smoke cases are cheap
    assert {r.case.plan.task for r in suite.rows} == {"sft", "generate"}
    for r in suite.rows:
        # 2 rounds; a cheap case (a sample under CHEAP_SAMPLE_S) sampled CHEAP_SAMPLES times a round
        assert len(r.case.samples) in (2, 2 * CHEAP_SAMPLES) and all(s > 0 for s in r.case.samples)
        assert r.measured_s > 0 and r.predicted_s > 0 and math.isfinite(r.error)
        assert r.compute_s > 0 and r.host_s > 0
        assert r.compute_s + r.host_s == pytest.approx(r.predicted_s)
        assert r.error == pytest.approx(r.predicted_s / r.measured_s - 1)
        # the figure is the mean of the samples; the quietest sample and the median are kept beside it
        assert r.measured_s == pytest.approx(sum(r.case.samples) / len(r.case.samples))
        assert r.case.quietest == min(r.case.samples) <= r.measured_s
        assert r.error_vs_median == pytest.approx(r.predicted_s / r.case.median - 1)
        assert r.error_vs_quietest == pytest.approx(r.predicted_s / r.case.quietest - 1)
        assert r.case.spread >= 0
        # the op-list check ran against the recorder, and the time per phase was measured
        assert r.ops_match in (True, False) and r.ops_note
        assert r.phases_measured and all(v >= 0 for v in r.phases_measured.values())
        assert r.phases_predicted
    gen = next(r for r in suite.rows if r.case.plan.task == "generate")
    assert {"prefill", "decode"} <= set(gen.phases_measured)
    assert {"generate/prefill", "generate/decode"} <= set(gen.phases_predicted)
    sft = next(r for r in suite.rows if r.case.plan.method == "full")
    assert {"forward", "backward", "optimizer"} <= set(sft.phases_measured)
    # the worst cases' kernels timed in the program, against their priced device time
    worst = max(suite.rows, key=lambda r: abs(r.error))
    assert worst.op_times and all(o.count > 0 and o.measured_s > 0 and o.priced_s >= 0 for o in worst.op_times)
    assert {o.phase for o in worst.op_times} & {"forward", "prefill", "decode"}


def test_predictions_are_the_engines_step_seconds(suite):
    for r in suite.rows:
        assert r.predicted_s == step_seconds(r.case.plan, r.case.model, suite.profile)


def test_the_profile_is_calibrated_in_the_same_run(suite):
    p = suite.profile
    assert p.device == "cpu" and p.measured_on
    assert suite.calibration.step_fit is not None and p.residuals
    assert suite.threads == 1
    assert set(suite.timings) >= {"calibration_s", "timing_s", "diagnostics_s", "total_s"}


def test_markdown_table_has_its_columns_and_summary(suite):
    md = tv.to_markdown(suite, csv_name="time-cpu.csv")
    assert md.startswith("# Step time on this CPU")
    assert TABLE_HEADER in md
    for r in suite.rows:
        assert f"| {r.case.label} |" in md
    for needle in ("median |error|", "worst", "torch threads 1", "the mean of the samples",
                   "Against the quietest sample of each", "Against the median of each",
                   "host.layer_s", "host.backward_op_s",
                   "Step fit residuals", "## Time per phase", "## Kernels in the program", "Versions: python",
                   "time-cpu.csv"):  # fmt: skip
        assert needle in md, needle
    rows = [line for line in md.splitlines() if line.startswith("| sft ") or line.startswith("| generate ")]
    assert len(rows) >= 6  # the cases table and the phase table
    assert all(line.count("|") == TABLE_HEADER.count("|") for line in rows[:3])


def test_csv_has_every_column_and_row(suite):
    rows = list(csv.DictReader(io.StringIO(tv.to_csv(suite))))
    assert len(rows) == 3 and tuple(rows[0]) == tv.CSV_COLUMNS
    for row, r in zip(rows, suite.rows):
        assert row["case"] == r.case.label and float(row["measured_s"]) == pytest.approx(r.measured_s, rel=1e-5)
        assert float(row["predicted_s"]) == pytest.approx(r.predicted_s, rel=1e-5)
        assert float(row["median_s"]) == pytest.approx(r.case.median, rel=1e-5)
        assert float(row["quietest_s"]) == pytest.approx(r.case.quietest, rel=1e-5)
        assert float(row["error_vs_quietest"]) == pytest.approx(r.error_vs_quietest, abs=1e-4)
        assert len(row["samples_s"].split(";")) == len(r.case.samples) >= 2 and "=" in row["phases_measured_s"]


def test_misses_are_explained():
    """A case off by more than 10% gets a line saying where: an op-list difference, the phases whose
    measured and predicted times differ most."""
    from planner.specs import Plan

    case = Case("sft full bf16 tiny", Plan(model="llama-3.2-1b", batch=1, seq=8), samples=[0.010])
    row = tv.Row(case, "tiny", predicted_s=0.006, compute_s=0.002, host_s=0.004, ops_match=False,
                 ops_note="engine vs recorded: elementwise 10 vs 12",
                 phases_measured={"forward": 0.004, "backward": 0.005, "optimizer": 0.001},
                 phases_predicted={"train/forward": (0.002, 0.001), "train/backward": (0.001, 0.001),
                                   "train/optimizer": (0.0005, 0.0005)})  # fmt: skip
    text = tv.why(row)
    assert "op list differs (elementwise 10 vs 12)" in text
    assert "backward under-predicted by 3 ms" in text and "forward under-predicted by 1 ms" in text
    assert tv.phase_table(row) == [("forward", 0.004, 0.003), ("backward", 0.005, 0.002), ("optimizer", 0.001, 0.001)]


def test_cases_are_interleaved(monkeypatch):
    """time_cases takes its samples round-robin over the cases (each round in its own order, so that
    a slow window of a shared machine does not hit the same neighbours every round), never one case's
    repeats back to back."""
    from planner.backends import timing
    from planner.specs import Plan

    calls = []

    def fake_time_steps(tech, plan, config, steps, warmup, threads=1):
        calls.append((plan.batch, steps))
        return [0.001 * plan.batch] * steps

    monkeypatch.setattr(timing, "time_steps", fake_time_steps)
    from planner.backends import step_programs

    monkeypatch.setattr(step_programs, "CHEAP_SAMPLES", 1)  # one sample a round (cheap ones: below)
    cases = [Case(f"c{b}", Plan(model="llama-3.2-1b", batch=b, seq=8), _config={}) for b in (1, 2, 3)]
    time_cases(cases, rounds=3)
    # the first: one untimed step of the (single) kind of program; then one step of each case,
    # timed to size its samples (SAMPLE_S of steps, at most MAX_STEPS)
    assert calls[0] == (1, 1) and calls[1:4] == [(1, 1), (2, 1), (3, 1)]
    from planner.backends.step_programs import MAX_STEPS, SAMPLE_S, steps_per_sample

    assert [c.steps for c in cases] == [min(MAX_STEPS, math.ceil(SAMPLE_S / (0.001 * b))) for b in (1, 2, 3)]
    assert all(n == c.steps for (b, n), c in zip(calls[4:7], cases) if b == c.plan.batch)
    assert steps_per_sample(10.0, 3) == 3 and steps_per_sample(0.0, 4) == 4 and steps_per_sample(1e-9, 3) == MAX_STEPS
    timed = [b for b, _ in calls[4:]]
    assert len(timed) == 9
    rounds = [timed[i:i + 3] for i in range(0, 9, 3)]
    assert all(sorted(r) == [1, 2, 3] for r in rounds)
    assert all(len(c.samples) == 3 for c in cases)
    # over more cases, the rounds' orders differ and no two cases are neighbours in every round
    calls.clear()
    many = [Case(f"c{b}", Plan(model="llama-3.2-1b", batch=b, seq=8), _config={}) for b in range(1, 9)]
    time_cases(many, rounds=5)
    timed = [b for b, _ in calls[1 + 8:]]
    rounds = [timed[i:i + 8] for i in range(0, 40, 8)]
    assert all(sorted(r) == list(range(1, 9)) for r in rounds) and len({tuple(r) for r in rounds}) == 5
    pairs = [{frozenset(p) for p in zip(r, r[1:])} for r in rounds]
    assert not set.intersection(*pairs), "some cases are neighbours in every round"
    # a cheap case (one sample under CHEAP_SAMPLE_S) is sampled 3 times a round, spread over the round;
    # a dear one (a 2 s step here) once
    monkeypatch.setattr(step_programs, "CHEAP_SAMPLES", 3)
    calls.clear()
    two = [Case("cheap", Plan(model="llama-3.2-1b", batch=1, seq=8), _config={}),
           Case("dear", Plan(model="llama-3.2-1b", batch=2000, seq=8), _config={})]
    time_cases(two, rounds=2)
    assert [len(c.samples) for c in two] == [6, 2]
    timed = [b for b, _ in calls[1 + 2:]]
    assert timed.count(1) == 6 and timed.count(2000) == 2 and timed[:4].count(2000) == 1


def test_main_writes_the_table_and_the_csv(tmp_path, monkeypatch, suite):
    monkeypatch.setattr(tv, "run_suite", lambda *a, **k: suite)
    out = tmp_path / "reports" / "time-cpu.md"
    assert tv.main(["--out", str(out), "--suite", "smoke", "--rounds", "2", "--quick-calibration"]) == 0
    md, text = out.read_text(), (tmp_path / "reports" / "time-cpu.csv").read_text()
    assert TABLE_HEADER in md and "--suite smoke" in md and "time-cpu.csv" in md
    assert text.splitlines()[0] == ",".join(tv.CSV_COLUMNS)


def test_planner_validate_runs_the_time_suite(tmp_path, monkeypatch, suite, capsys):
    """`planner validate --suite time-cpu` writes the same table through the CLI (the run itself
    stubbed with the smoke suite's result), and no temporary file is left beside it."""
    import json

    from planner.cli import main

    monkeypatch.setattr(tv, "run_suite", lambda *a, **k: suite)
    assert main(["validate", "--suite", "time-cpu", "--out", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["suite"] == "time-cpu" and doc["cases"] == len(suite.rows)
    assert doc["worst_abs_error"] == pytest.approx(max(abs(r.error) for r in suite.rows))
    md = (tmp_path / "time-cpu.md").read_text()
    assert TABLE_HEADER in md and "planner validate --suite time-cpu" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["time-cpu.csv", "time-cpu.md"]


def test_time_suite_without_torch_is_bad_input(monkeypatch, capsys):
    import importlib.util

    from planner.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert main(["validate", "--suite", "time-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs torch" in err and "pip install torch==2.13.0" in err
