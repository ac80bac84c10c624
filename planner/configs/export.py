"""A plan written as the configs of the tools people train with (`planner export`).

Each format gives its files (name -> text); a ZeRO layout adds one DeepSpeed JSON the trainer's or
accelerate's config names. What a format cannot express is a ConfigError that says so, before
anything is written.
"""

from __future__ import annotations

import json
from typing import Any

from planner.configs import FORMATS, ConfigError

DS_FILE = "ds_config.json"
FILES = {"trl": "trl_config.yaml", "accelerate": "accelerate_config.yaml", "deepspeed": DS_FILE,
         "llamafactory": "llamafactory_config.yaml", "axolotl": "axolotl_config.yaml"}


def _yaml(data: dict[str, Any], header: str) -> str:
    import yaml

    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def render(plan: Any, layout: dict[str, Any], formats: list[str], command: str = "") -> dict[str, str]:
    """The files of `formats` for the plan and layout: file name -> text."""
    import importlib

    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("planner")
    except PackageNotFoundError:
        __version__ = "(not installed)"
    for fmt in formats:
        if fmt not in FORMATS:
            from planner.errors import did_you_mean

            raise ConfigError(f"to: unknown format '{fmt}'{did_you_mean(fmt, FORMATS)} (formats: {', '.join(FORMATS)})")
    unsupported = [k for k in ("tp", "pp") if layout.get(k, 1) > 1]
    if unsupported:
        raise ConfigError(f"{unsupported[0]}: tensor and pipeline parallelism have no setting in these tools' configs "
                          "(the planner models them for Megatron-style layouts)")
    ds = layout.get("zero") is not None and not layout.get("fsdp")
    files: dict[str, str] = {}
    made_by = f"written by planner {__version__}" + (f": {command}" if command else "")
    for fmt in formats:
        mod = importlib.import_module(f"planner.configs.{fmt}")
        if fmt == "deepspeed":
            files[DS_FILE] = json.dumps(mod.write(plan, layout), indent=2) + "\n"
            continue
        data = mod.write(plan, layout, deepspeed_file=DS_FILE if ds else None)  # its task and values first
        _expressible(plan, fmt, getattr(mod, "EXPRESSES", None))
        run = _run_line(fmt, plan, FILES[fmt])
        files[FILES[fmt]] = _yaml(data, f"{made_by}\n{run}")
    if ds and DS_FILE not in files and any(f != "deepspeed" for f in formats):
        files[DS_FILE] = json.dumps(importlib.import_module("planner.configs.deepspeed").write(plan, layout), indent=2) + "\n"
    return files


def _run_line(fmt: str, plan: Any, name: str) -> str:
    if fmt == "trl":
        from planner.configs.trl import TASKS

        return f"run (in this directory): trl {TASKS.get(plan.task, plan.task)} --config {name}"
    if fmt == "accelerate":
        return f"run (in this directory): accelerate launch --config_file {name} YOUR_SCRIPT.py"
    if fmt == "llamafactory":
        return f"run (in this directory): llamafactory-cli train {name} (set dataset and template to yours)"
    return f"run (in this directory): axolotl train {name} (set datasets to yours)"


# the card is the planner's question, not a trainer's setting
NOT_TRAINER_FIELDS = ("gpu", "gpu_memory")


def _expressible(plan: Any, fmt: str, fields: "tuple[str, ...] | None") -> None:
    """A trainer's config must state the whole plan: a field it has no key for must hold its default."""
    if fields is None:
        return
    for name, info in type(plan).model_fields.items():
        if name in fields or name in NOT_TRAINER_FIELDS:
            continue
        value = getattr(plan, name)
        if value != info.default:
            raise ConfigError(f"{fmt}: {name} {value} has no setting in its config (only the planner's default, "
                              f"{info.default}, can be exported)")
