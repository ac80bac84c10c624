"""One answer document for one GPU and many: every kind of `planner fit --json` output validates
against the published JSON schema (planner.answer), with the same top-level keys and blocks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jsonschema
import pytest

from planner.answer import FitDocument, json_schema, markdown
from planner.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"schema_version", "fits", "headroom_bytes", "gpu", "model", "technique", "plan", "layout", "engine",
          "memory", "time", "resident", "allocator", "suggestions", "limits", "warnings"}
EXTRAS = {"collectives", "cpu_memory", "stages", "model_states"}

CASES = {
    "one GPU, fits": ["--model", "qwen2.5-0.5b", "--gpu", "h200", "--seq", "512"],
    "one GPU, does not fit": ["--model", "llama-3.1-8b", "--gpu", "t4", "--batch", "4"],
    "one GPU, generate": ["--model", "llama-3.2-1b", "--gpu", "h100-sxm", "--task", "generate"],
    "one GPU, dpo": ["--model", "llama-3.2-1b", "--gpu", "h100-sxm", "--task", "dpo", "--seq", "1024"],
    "one GPU, card without FLOP/s": ["--model", "qwen2.5-0.5b", "--gpu-memory", "24GiB", "--seq", "512"],
    "many GPUs, sft": ["--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--gpus", "8", "--zero", "3"],
    "many GPUs, does not fit": ["--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--gpus", "2", "--zero", "1"],
    "many GPUs, dpo": ["--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--task", "dpo", "--gpus", "8",
                       "--fsdp", "full-shard", "--seq", "1024"],
    "many GPUs, tp pp offload": ["--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--gpus", "16", "--tp", "2",
                                 "--pp", "2", "--zero", "1", "--offload", "optimizer", "--grad-accum", "4"],
}


def _doc(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(["fit", *argv, "--json"], stdout=out, stderr=err)
    assert code in (0, 1), err.getvalue()
    return json.loads(out.getvalue())


@pytest.mark.parametrize("name", list(CASES))
def test_output_validates_against_the_schema(name):
    doc = _doc(CASES[name])
    jsonschema.validate(doc, json_schema())
    FitDocument.model_validate(doc)  # and round-trips through the model it was made from
    many = "--gpus" in CASES[name]
    assert set(doc) == COMMON | (EXTRAS if many else set())
    assert doc["layout"]["gpus"] == (int(CASES[name][CASES[name].index("--gpus") + 1]) if many else 1)
    m, t = doc["memory"], doc["time"]
    assert sum(m["breakdown"].values()) == m["peak_allocated_bytes"]
    a = doc["allocator"]
    if a["simulated"]:  # reserved and the verdict are the simulation's
        assert m["reserved_bytes"] == a["reserved_bytes"] and doc["fits"] == a["fits"]
        assert a["min_card_bytes"] == a["min_capacity_bytes"] + m["device_bytes"] - m["reserved_bytes"]
    else:
        assert a["not_simulated"] and a["reserved_bytes"] is None
    if t["step_s"] is not None:
        parts = [t[k] or 0.0 for k in ("compute_s", "host_s", "exposed_comm_s", "bubble_s")]
        assert sum(parts) == pytest.approx(t["step_s"])
        assert t["tokens_per_s"] == pytest.approx(t["tokens_per_step"] / t["step_s"], rel=1e-6)


def test_the_schema_rejects_what_is_not_the_document():
    doc = _doc(CASES["one GPU, fits"])
    del doc["memory"]["breakdown"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json_schema())


def test_json_schema_flag_prints_the_schema():
    out, err = io.StringIO(), io.StringIO()
    assert main(["fit", "--json-schema"], stdout=out, stderr=err) == 0
    assert json.loads(out.getvalue()) == json_schema()


def test_docs_json_md_is_current():
    assert (ROOT / "docs" / "json.md").read_text(encoding="utf-8") == markdown()
