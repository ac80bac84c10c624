"""Plans from YAML files and command-line flags, with one-line errors.

A plan file is a YAML mapping whose keys are `Plan`'s field names; dashes work too
(`grad-ckpt`, `lora-rank`), `gpu_memory` takes a size ("24GiB"), `lora_targets` a list or a comma
string. Flags override the file. Everything the user set, in the file or by a flag, counts as
"given": options that the plan's method or task would ignore are rejected (`check_applicable`).

Errors are `PlanError` with one line naming the field:
    plan.yaml: unknown key 'lora_rnk' (did you mean: lora_rank?)
    precision: must be one of fp32, bf16, fp16, mixed-bf16, mixed-fp16 (got 'bf32')
    batch: must be > 0 (got 0)
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from planner.errors import PlanError, did_you_mean, one_line
from planner.specs import MAX_COUNT, Plan, check_applicable
from planner.units import SizeError, parse_size

FIELDS: tuple[str, ...] = tuple(Plan.model_fields)


def normalize_key(key: Any) -> str:
    return str(key).strip().replace("-", "_")


def load_plan_file(path: str | Path, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The file's settings, keys normalized to field names; PlanError on any problem. `extra_keys`:
    other settings the command takes besides the Plan's fields (the layout's, for `fit`)."""
    from planner.configs.base import load_mapping

    name = str(path)
    data = load_mapping(path, "plan file")
    out: dict[str, Any] = {}
    known = FIELDS + tuple(extra_keys)
    for key, value in data.items():
        field = normalize_key(key)
        if field not in known:
            raise PlanError(f"{name}: unknown key '{key}'{did_you_mean(field, known)}")
        if field in out:
            raise PlanError(f"{name}: key '{key}' given twice (as '{field}')")
        out[field] = value
    return out


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Forms the plan file and flags may use that Plan itself does not take."""
    out = dict(values)
    gm = out.get("gpu_memory")
    if gm is not None and not isinstance(gm, bool):
        try:
            out["gpu_memory"] = parse_size(gm)
        except SizeError as e:
            raise PlanError(f"gpu_memory: {e}") from None
    targets = out.get("lora_targets")
    if isinstance(targets, (list, tuple)):
        out["lora_targets"] = ",".join(str(t) for t in targets)
    return out


def build_plan(
    file_values: dict[str, Any] | None = None,
    flag_values: dict[str, Any] | None = None,
) -> tuple[Plan, set[str]]:
    """Merge file settings and flags (flags win; None means 'not given'), validate, check applicability.

    Returns the plan and the set of field names the user gave.
    """
    merged: dict[str, Any] = {}
    for source in (file_values or {}, flag_values or {}):
        for key, value in source.items():
            field = normalize_key(key)
            if field not in FIELDS:
                raise PlanError(f"unknown setting '{key}'{did_you_mean(field, FIELDS)}")
            if value is not None:
                merged[field] = value
    given = set(merged)
    if "model" not in merged:
        raise PlanError("model: give --model ID (a catalog id, a config.json or a model directory)")
    merged = _coerce(merged)
    try:
        plan = Plan(**merged)
    except ValidationError as e:
        raise PlanError(validation_message(e)) from None
    try:
        check_applicable(plan, given)
    except ValueError as e:
        raise PlanError(one_line(e)) from None
    return plan, given


def layout_values(fields: dict[str, Any]) -> dict[str, Any]:
    """Layout settings as planner.engine.distributed.Layout takes them: sizes parsed (`cpu_memory: 1TiB`)."""
    out = {normalize_key(k): v for k, v in fields.items() if v is not None}
    cm = out.get("cpu_memory")
    if cm is not None and not isinstance(cm, bool):
        try:
            out["cpu_memory"] = parse_size(cm)
        except SizeError as e:
            raise PlanError(f"cpu_memory: {e}") from None
    return out


def plan_from_file(path: str | Path, flag_values: dict[str, Any] | None = None) -> tuple[Plan, set[str]]:
    return build_plan(load_plan_file(path), flag_values)


# ---- pydantic errors as one line ----------------------------------------------------------------
def _allowed_values(field: str) -> list[str] | None:
    info = Plan.model_fields.get(field)
    if info is None:
        return None
    values: list[str] = []

    def walk(tp: Any) -> None:
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            values.extend(str(a) for a in typing.get_args(tp))
        elif origin is not None:
            for a in typing.get_args(tp):
                walk(a)

    walk(info.annotation)
    return values or None


def _got(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _one_error(err: dict) -> str:
    loc = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
    field = loc[0] if loc else "plan"
    typ = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    got = f" (got {_got(value)})"
    if typ == "literal_error":
        allowed = _allowed_values(field)
        if allowed:
            return f"{field}: must be one of {', '.join(allowed)}{got}"
    if typ == "greater_than":
        return f"{field}: must be > {ctx.get('gt')}{got}"
    if typ == "greater_than_equal":
        return f"{field}: must be >= {ctx.get('ge')}{got}"
    if typ == "less_than":
        return f"{field}: must be < {ctx.get('lt')}{got}"
    if typ == "less_than_equal":
        le = ctx.get("le")
        return f"{field}: must be <= {'10^30' if le == MAX_COUNT else le}{got}"
    if typ in ("int_parsing", "int_type", "int_from_float"):
        return f"{field}: must be a whole number{got}"
    if typ in ("float_parsing", "float_type"):
        return f"{field}: must be a number{got}"
    if typ in ("bool_parsing", "bool_type"):
        return f"{field}: must be true or false{got}"
    if typ in ("string_type",):
        return f"{field}: must be a string{got}"
    if typ == "missing":
        return f"{field}: required"
    if typ == "extra_forbidden":
        return f"unknown setting '{field}'{did_you_mean(field, FIELDS)}"
    msg = one_line(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        if msg.startswith(f"{field}:"):
            return msg
    return f"{field}: {msg}{got}"


def validation_message(exc: ValidationError) -> str:
    """A pydantic ValidationError as one line ('; ' between several errors)."""
    parts: list[str] = []
    for err in exc.errors():
        line = _one_error(err)
        if line not in parts:
            parts.append(line)
    return "; ".join(parts) if parts else one_line(str(exc))
