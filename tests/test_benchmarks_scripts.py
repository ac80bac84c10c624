"""The benchmark scripts run (smoke tests with tiny repeats; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_estimate_speed_runs(capsys):
    mod = _load("estimate_speed")
    assert mod.main(["--repeats", "1", "--min-time", "0.0001", "--no-peer", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cases = {r["case"] for r in out["rows"]}
    assert {"full bf16 b1 s2048", "qlora ckpt b4 s2048", "generate b16", "varying batch/seq"} <= cases
    assert all(r["ours_us"] > 0 for r in out["rows"])


def test_cli_fit_path_imports_no_torch_or_pandas():
    mod = _load("cli_cold_start")
    loaded = mod.heavy_modules_on_fit_path()
    assert not loaded["torch"] and not loaded["pandas"], loaded


def test_importtime_parser():
    mod = _load("cli_cold_start")
    rows = mod.importtime("import decimal", 1000)
    assert rows and rows[0]["cumulative_us"] >= rows[-1]["cumulative_us"]
    assert any(r["module"] == "decimal" for r in rows)
    assert len(mod.importtime("import decimal", 3)) == 3


def test_fit_speed_runs(capsys):
    mod = _load("fit_speed")
    assert mod.main(["--repeats", "1", "--plans", "8b-full-b1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["plan"] == "8b-full-b1" and row["events"] > 0
    assert all(row[k] > 0 for k in ("cold_ms", "warm_ms", "replay_ms", "answer_ms"))


def test_plan_speed_runs(capsys):
    mod = _load("plan_speed")
    assert mod.main(["--repeats", "1", "--cases", "8b-8gpus", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["space"] >= row["priced"] + row["dominated"] > 0 and row["candidates_per_s"] > 0
