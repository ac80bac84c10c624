"""The model catalog: bundled HF config.json files, and configs the user points at.

A model reference is a catalog id (`llama-3.1-8b`), a path to a config.json, a model directory
holding one, or the Hugging Face hub id of a catalog entry (`meta-llama/Llama-3.1-8B`, matched
case-insensitively; a path that exists wins over a hub id). Nothing is ever downloaded: a hub id
outside the catalog is an error that names the close catalog entries. Catalog files are the hub's
config.json plus a `_planner` key (display name, hub id, source), which is stripped before anything
reaches transformers. Like architecture.py, this module
never imports torch or transformers.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
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
    hf_id: str | None
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


def _close(word: str, choices: list[str], n: int) -> list[str]:
    """difflib's close matches, case-insensitive (hub ids mix cases: Llama-3.1-8B), best first."""
    by_low = {c.lower(): c for c in choices}
    return [by_low[m] for m in difflib.get_close_matches(word.lower(), list(by_low), n=n, cutoff=0.6)]


def _unknown(ref: str) -> ModelError:
    ids = _ids()
    close = _close(ref, list(ids), 5)
    hint = f"did you mean: {', '.join(close)}?" if close else f"known ids: {', '.join(ids)}"
    return ModelError(f"model: unknown model '{ref}' ({hint})")


# A hub repo id: "namespace/name" of letters, digits, '_', '.', '-' (what huggingface_hub's
# validate_repo_id accepts, near enough). './x', '~/x', 'a/b/c' and '*.json' are paths, never hub ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _looks_like_hub_id(ref: str) -> bool:
    return _HUB_ID.fullmatch(ref) is not None and not ref.lower().endswith(".json")


@functools.cache
def _hub_index() -> dict[str, str]:
    """Lower-cased `_planner.hf_id` -> catalog id. Built only when a hub-looking ref is not a file."""
    index: dict[str, str] = {}
    for model_id in _ids():
        hub = (_catalog_entry(model_id).get(PLANNER_KEY) or {}).get("hf_id")
        if isinstance(hub, str) and hub:
            index[hub.lower()] = model_id
    return index


def _catalog_id(ref: str) -> str | None:
    """The catalog id `ref` names: itself, or the entry whose hub id it is (unless a file is there)."""
    if ref in _ids():
        return ref
    if _looks_like_hub_id(ref) and not Path(ref).expanduser().exists():
        return _hub_index().get(ref.lower())
    return None


def _unknown_hub(ref: str) -> ModelError:
    """A hub-looking ref that is neither a file nor a catalog hub id: close hub ids first, then close
    catalog ids (matched on the name after the '/'), skipping an id whose hub id is already listed."""
    index = _hub_index()
    hub_ids = {model_id: (_catalog_entry(model_id).get(PLANNER_KEY) or {}).get("hf_id") for model_id in index.values()}
    found = _close(ref, [h for h in hub_ids.values() if h], 3)
    for model_id in _close(ref.split("/", 1)[1], list(_ids()), 3):
        if hub_ids.get(model_id) not in found:
            found.append(model_id)
    hint = f" (did you mean: {', '.join(found[:3])}?)" if found else " (see `planner models` for the catalog's hub ids)"
    return ModelError(
        f"model: '{ref}' is neither a file nor a known hub id{hint}; nothing is downloaded, so for other models "
        "pass a local config.json or model directory"
    )


def _resolve(ref: str) -> tuple[dict[str, Any], str, str]:
    """(raw config with `_planner`, id, where) for a catalog id or hub id, config.json path or model directory."""
    model_id = _catalog_id(ref)
    if model_id is not None:
        return _catalog_entry(model_id), model_id, str(_catalog_dir().joinpath(f"{model_id}.json"))
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
    elif _looks_like_hub_id(ref):
        raise _unknown_hub(ref)
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
    """The raw HF config (without `_planner`), for backends that build the real transformers model.
    Resolves `ref` exactly as load_model does (a hub id gives its catalog entry's config)."""
    if _catalog_id(ref) is None:
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
    """ModelSpec for a catalog id or its hub id, a config.json path, or a model directory. Raises ModelError."""
    model_id = _catalog_id(ref)
    if model_id is not None:
        return _catalog_spec(model_id)  # a hub id gets the catalog's spec itself: id = catalog id
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
            id=s.id, name=s.name, hf_id=s.hf_id, params=s.num_params, layers=s.num_layers, hidden=s.hidden_size,
            heads=s.num_attention_heads, kv_heads=s.num_key_value_heads, vocab=s.vocab_size,
            context=s.max_position_embeddings,
        ))
    return rows
