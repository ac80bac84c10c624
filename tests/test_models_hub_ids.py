"""Hugging Face hub ids of catalog entries resolve to those entries; other hub ids are one-line errors.

Expected values come from the catalog files themselves (`_planner.hf_id`), never copied here.
"""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest

from planner.cli import main
from planner.models import ModelError, list_models, load_model, model_config, model_ids


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _hub_ids() -> dict[str, str]:
    """catalog id -> hub id, read from the spec (i.e. from the catalog file's `_planner` key)."""
    return {i: load_model(i).hf_id for i in model_ids() if load_model(i).hf_id}


def test_every_catalog_entry_has_a_distinct_hub_id() -> None:
    hubs = _hub_ids()
    assert set(hubs) == set(model_ids())
    assert len({h.lower() for h in hubs.values()}) == len(hubs)


@pytest.mark.parametrize("model_id", model_ids())
def test_hub_id_gives_the_catalog_spec_and_config(model_id: str) -> None:
    hub = _hub_ids()[model_id]
    for ref in (hub, hub.lower(), hub.upper()):
        spec = load_model(ref)
        assert spec is load_model(model_id)  # the catalog's own spec: id is the catalog id
        assert spec.id == model_id
        assert model_config(ref) == model_config(model_id)  # backends resolve the same way


@pytest.mark.parametrize("hub", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B"])
def test_fit_with_a_hub_id_is_the_catalog_estimate(hub: str) -> None:
    model_id = next(i for i, h in _hub_ids().items() if h == hub)
    code_hub, out_hub, err_hub = _run(["fit", "--model", hub, "--gpu", "h200", "--json"])
    code_id, out_id, _ = _run(["fit", "--model", model_id, "--gpu", "h200", "--json"])
    assert code_hub == code_id == 0, err_hub
    by_hub, by_id = json.loads(out_hub), json.loads(out_id)
    assert by_hub["model"]["id"] == model_id
    for key in ("model", "memory", "time", "fits"):
        assert by_hub[key] == by_id[key], key


def test_serve_with_a_hub_id() -> None:
    code, out, err = _run(["serve", "--model", "qwen/qwen2.5-7b", "--gpu", "h100-sxm", "--capacity-only", "--json"])
    assert code == 0, err
    assert json.loads(out)["model"] == "qwen2.5-7b"


def test_a_path_on_disk_wins_over_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = _hub_ids()["llama-3.1-8b"]
    local = tmp_path / hub
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps(model_config("llama-3.1-8b") | {"num_hidden_layers": 2}))
    monkeypatch.chdir(tmp_path)
    spec = load_model(hub)
    assert spec.num_layers == 2 and spec.id == local.name and spec.hf_id is None
    assert model_config(hub)["num_hidden_layers"] == 2


@pytest.mark.parametrize(("ref", "first"), [
    ("meta-llama/Llama-3.1-8b-Instruct", "meta-llama/Llama-3.1-8B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
    ("google/gemma-2-9b-it", "google/gemma-2-9b"),
])  # fmt: skip
def test_unknown_hub_id_suggests_close_hub_ids(ref: str, first: str) -> None:
    assert first in _hub_ids().values()  # the suggestion is a real catalog hub id
    code, out, err = _run(["fit", "--model", ref, "--gpu", "h200"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"planner: error: model: '{ref}' is neither a file nor a known hub id (did you mean: {first}")


def test_unknown_hub_id_without_close_matches_and_nothing_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the planner tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelError) as e:
        load_model("zz-org/qqqq")
    msg = str(e.value)
    assert "neither a file nor a known hub id" in msg and "did you mean" not in msg and "planner models" in msg
    assert "\n" not in msg
    with pytest.raises(ModelError, match="neither a file nor a known hub id"):
        model_config("zz-org/qqqq")


@pytest.mark.parametrize("ref", ["./nope/config.json", "nope.json", "a/b/c", "org/config.json"])
def test_paths_that_are_not_hub_ids_keep_the_file_error(ref: str) -> None:
    with pytest.raises(ModelError, match=r"no such file or directory"):
        load_model(ref)


def test_models_lists_the_hub_id() -> None:
    code, out, _ = _run(["models"])
    assert code == 0
    lines = out.splitlines()
    assert "hub id" in lines[0]
    for model_id, hub in _hub_ids().items():
        row = next(line for line in lines if line.startswith(model_id + " "))
        assert hub in row.split(), (model_id, row)
    code, out, _ = _run(["models", "--json"])
    rows = json.loads(out)
    assert {r["id"]: r["hf_id"] for r in rows} == _hub_ids()
    assert [r["hf_id"] for r in rows] == [r["hf_id"] for r in list_models()]
