"""The model catalog: bundled HF config.json files, and configs the user points at.

A model reference is a catalog id (`llama-3.1-8b`), a path to a config.json, or a model directory
holding one. Catalog files are the hub's config.json plus a `_planner` key (display name, hub id,
source), which is stripped before anything reaches transformers. Like architecture.py, this module
never imports torch or transformers.
"""

from __future__ import annotations

import difflib
import functools
import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypedDict

from planner.architecture import ModelError, ModelSpec, spec_from_config

__all__ = ["ModelError", "ModelRow", "list_models", "load_model", "model_config", "model_ids"]

PLANNER_KEY = "_planner"


class ModelRow(TypedDict):
    """One row of the `planner models` table."""

    id: str
    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    context: int


def _catalog_dir() -> Traversable:
    # importlib.resources so the bundled files are found when the package is installed (package-data).
    return resources.files("planner").joinpath("data", "models")


@functools.cache
def _ids() -> tuple[str, ...]:
    return tuple(sorted(p.name.removesuffix(".json") for p in _catalog_dir().iterdir() if p.name.endswith(".json")))


def model_ids() -> list[str]:
    """Catalog ids, sorted."""
    return list(_ids())


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"model: config.json at {where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"model: config.json at {where} is not a JSON object")
    return cfg


@functools.cache
def _catalog_entry(model_id: str) -> dict[str, Any]:
    entry = _catalog_dir().joinpath(f"{model_id}.json")
    return _parse(entry.read_text(encoding="utf-8"), str(entry))


def _unknown(ref: str) -> ModelError:
    ids = _ids()
    close = difflib.get_close_matches(ref, ids, n=5, cutoff=0.6)
    hint = f"did you mean: {', '.join(close)}?" if close else f"known ids: {', '.join(ids)}"
    return ModelError(f"model: unknown model '{ref}' ({hint})")


def _resolve(ref: str) -> tuple[dict[str, Any], str, str]:
    """(raw config with `_planner`, id, where) for a catalog id, config.json path or model directory."""
    if ref in _ids():
        return _catalog_entry(ref), ref, str(_catalog_dir().joinpath(f"{ref}.json"))
    path = Path(ref).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ModelError(f"model: no config.json in directory {path}")
        model_id = path.resolve().name
    elif path.is_file():
        file = path
        # a checkpoint's config.json is named after its directory; a loose my-model.json after itself
        model_id = path.resolve().parent.name if path.name == "config.json" else path.stem
    elif path.suffix == ".json" or "/" in ref or "\\" in ref:
        raise ModelError(f"model: no such file or directory '{ref}'")
    else:
        raise _unknown(ref)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"model: cannot read config.json at {file}: {e}") from None
    return _parse(text, str(file)), model_id, str(file)


def _plugin_model(ref: str) -> dict[str, Any] | None:
    """A config registered by a plugin (`register_models`), looked up only for names that are
    neither catalog ids nor paths, so plain catalog use never loads plugins."""
    if "/" in ref or "\\" in ref or ref.endswith(".json"):
        return None
    from planner.plugins import registry

    reg = registry()
    if ref not in reg.models:
        reg = registry(scan=True)
    return reg.models.get(ref)


def model_config(ref: str) -> dict[str, Any]:
    """The raw HF config (without `_planner`), for backends that build the real transformers model."""
    if ref not in _ids():
        plugged = _plugin_model(ref)
        if plugged is not None:
            return {k: v for k, v in plugged.items() if k != PLANNER_KEY}
    raw, _, _ = _resolve(ref)
    return {k: v for k, v in raw.items() if k != PLANNER_KEY}


def _spec(raw: dict[str, Any], model_id: str, where: str) -> ModelSpec:
    meta = raw.get(PLANNER_KEY) or {}
    cfg = {k: v for k, v in raw.items() if k != PLANNER_KEY}
    return spec_from_config(cfg, id=model_id, name=meta.get("name"), hf_id=meta.get("hf_id"), where=where)


@functools.cache
def _catalog_spec(model_id: str) -> ModelSpec:
    # ModelSpec is frozen, so catalog specs are safe to share; user files are re-read every time.
    raw, _, where = _resolve(model_id)
    return _spec(raw, model_id, where)


def load_model(ref: str) -> ModelSpec:
    """ModelSpec for a catalog id, a config.json path, or a model directory. Raises ModelError."""
    if ref in _ids():
        return _catalog_spec(ref)
    try:
        return _spec(*_resolve(ref))
    except ModelError:
        plugged = _plugin_model(ref)
        if plugged is None:
            raise
        return _spec(plugged, ref, f"plugin model '{ref}'")


def list_models() -> list[ModelRow]:
    """Rows for `planner models`, in id order."""
    rows: list[ModelRow] = []
    for model_id in model_ids():
        s = load_model(model_id)
        rows.append(ModelRow(
            id=s.id, name=s.name, params=s.num_params, layers=s.num_layers, hidden=s.hidden_size,
            heads=s.num_attention_heads, kv_heads=s.num_key_value_heads, vocab=s.vocab_size,
            context=s.max_position_embeddings,
        ))
    return rows
