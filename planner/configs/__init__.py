"""Plans in and out: the configs people train with, read into a plan (`planner fit --from FILE`) and
written from one (`planner export`).

Formats: trl (a `trl sft|dpo|grpo|reward --config` YAML), accelerate (an `accelerate launch
--config_file` YAML), deepspeed (a DeepSpeed JSON), llamafactory (a `llamafactory-cli train` YAML),
axolotl (an `axolotl train` YAML). A file's format is told by its keys, or named before it:
`--from trl:config.yaml`. Several files combine (`--from trl.yaml --from accelerate.yaml`), and the
files they name (a `deepspeed:` JSON, accelerate's `deepspeed_config_file`) are read with them.

Combining: a field stated by two files with different values is an error naming both, unless a flag
or the plan file gives it; a tool's default for a key a file leaves out (TRL's batch of 8) and an
implied setting (accelerate's mixed_precision) yield to a file that states the field. Flags and the
plan file override what the configs say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.configs.base import ConfigError, Imported, load_mapping

FORMATS: tuple[str, ...] = ("trl", "accelerate", "deepspeed", "llamafactory", "axolotl")

__all__ = ["FORMATS", "ConfigError", "Imported", "Combined", "read_configs", "detect"]


@dataclass
class Combined:
    """The settings of several config files together."""

    plan: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def _module(fmt: str) -> Any:
    import importlib

    return importlib.import_module(f"planner.configs.{fmt}")


def detect(data: dict[str, Any], name: str) -> str:
    """The format a file's keys say it is in (ConfigError when none does)."""
    for fmt in ("deepspeed", "accelerate", "llamafactory", "axolotl", "trl"):
        if _module(fmt).looks_like(data):
            return fmt
    raise ConfigError(f"{name}: not a config of a format the planner reads ({', '.join(FORMATS)}); name the format "
                      f"before the path (--from trl:{name}) if it is one")


def split_ref(ref: str) -> tuple[str | None, str]:
    """'trl:path' -> ('trl', 'path'); a plain path -> (None, path)."""
    head, sep, tail = ref.partition(":")
    if sep and head.lower() in FORMATS:
        return head.lower(), tail
    return None, ref


def read_one(ref: str, task: str | None = None, given: set[str] | None = None) -> list[Imported]:
    """One file (and those it names), read."""
    fmt, path = split_ref(ref)
    data = load_mapping(path)
    return _read(data, path, Path(path), fmt, task, given)


def _read(data: dict[str, Any], name: str, path: Path | None, fmt: str | None, task: str | None,
          given: set[str] | None = None) -> list[Imported]:
    fmt = fmt or detect(data, name)
    mod = _module(fmt)
    got = mod.read(data, name, path, task=task, given=given)
    out = [got]
    for where, target in got.includes:
        if isinstance(target, dict):  # a DeepSpeed config given inline
            out += _read(target, where, None, "deepspeed", task, given)
            continue
        found = _find(target, path)
        if found is None:
            raise ConfigError(f"{where}: no such file {target.name} (looked beside the file and in the working "
                              f"directory: {target}, {_relative(target, path)})")
        out += _read(load_mapping(found), str(found), found, "deepspeed", task, given)
    return out


def _relative(target: Path, path: Path | None) -> Path:
    """`target` as written in the file (it was joined to the file's directory)."""
    if path is not None:
        try:
            return target.relative_to(path.parent)
        except ValueError:
            pass
    return target


def _find(target: Path, path: Path | None) -> Path | None:
    """A file another names: beside the naming file, else where the tool would open it (the working
    directory: the Trainer, accelerate and LLaMA-Factory open the path as given)."""
    for candidate in (target, _relative(target, path)):
        if candidate.is_file():
            return candidate
    return None


# precision families: a weak precision agrees with a stated one of the same half type
_FAMILY = {"fp32": "fp32", "bf16": "bf16", "mixed-bf16": "bf16", "fp16": "fp16", "mixed-fp16": "fp16"}


def _agrees(field: str, weak: Any, strong: Any) -> bool:
    if field == "precision":
        return _FAMILY.get(weak) == _FAMILY.get(strong)
    return weak == strong


def read_configs(refs: list[str], given: set[str] | None = None, task: str | None = None,
                 method: str | None = None) -> Combined:
    """Read and combine config files. `given`: fields a flag or the plan file sets (no conflict is
    checked for them); `task`, `method`: those settings when a flag or the plan file gives them (the
    fields read are those the technique and method take: `_applicable`)."""
    given = given or set()
    files: list[Imported] = []
    for ref in refs:
        files += read_one(ref, task, given)
    out = Combined(sources=[f"{f.source} ({f.format})" for f in files])
    stated: dict[str, tuple[Any, str]] = {}
    layout: dict[str, tuple[Any, str]] = {}
    for f in files:
        for k, v in f.plan.items():
            if k in stated and stated[k][0] != v and k not in given:
                raise ConfigError(f"{k}: {stated[k][1]} gives {stated[k][0]!r}, {f.source} gives {v!r}")
            stated.setdefault(k, (v, f.source))
        for k, v in f.layout.items():
            if k in layout and layout[k][0] != v:
                raise ConfigError(f"{k}: {layout[k][1]} gives {layout[k][0]!r}, {f.source} gives {v!r}")
            layout.setdefault(k, (v, f.source))
        out.warnings += f.warnings
    # implied settings and tools' defaults: yield to a stated value, and must agree with it
    weak: dict[str, tuple[Any, str]] = {}
    for f in files:
        for k, v in f.weak.items():
            if k in given:
                continue
            if k in stated:
                if k == "precision" and not _agrees(k, v, stated[k][0]):
                    raise ConfigError(f"{k}: {stated[k][1]} gives {stated[k][0]!r}, {f.source} implies {v!r}")
                continue
            if k in weak and not _agrees(k, v, weak[k][0]):
                raise ConfigError(f"{k}: {weak[k][1]} implies {weak[k][0]!r}, {f.source} implies {v!r} "
                                  f"(give --{k.replace('_', '-')})")
            # a DeepSpeed half type (weights held in it) is more exact than accelerate's autocast
            if k not in weak or (f.format == "deepspeed" and k == "precision"):
                weak[k] = (v, f.source)
    out.plan = {k: v for k, (v, _) in stated.items()}
    out.plan.update({k: v for k, (v, _) in weak.items() if k not in out.plan})
    out.layout = {k: v for k, (v, _) in layout.items()}
    _check_batch(files, out)
    if "model" in out.plan and "model" not in given:
        out.plan["model"] = _catalog_model(out.plan["model"], out)
    out.plan = _applicable(out, task or out.plan.get("task", "sft"), method or out.plan.get("method", "full"))
    if out.layout and set(out.layout) <= {"gpus", "gpus_per_node"} and out.layout.get("gpus", 1) == 1:
        out.layout = {}  # one process, nothing sharded: the single-GPU plan
    return out


def _check_batch(files: list[Imported], out: Combined) -> None:
    """DeepSpeed's rule: train_batch_size = micro-batch x accumulation x data-parallel ranks."""
    for f in files:
        total = f.checks.get("train_batch_size")
        if total is None:
            continue
        micro, accum = out.plan.get("batch", 1), out.plan.get("grad_accum", 1)
        gpus = out.layout.get("gpus")
        if gpus is not None:
            if micro * accum * gpus != total:
                raise ConfigError(f"{f.source}: train_batch_size {total} is not micro-batch {micro} x accumulation "
                                  f"{accum} x {gpus} processes = {micro * accum * gpus}")
        elif total % (micro * accum) == 0 and total // (micro * accum) > 1:
            out.warnings.append(f"{f.source}: train_batch_size {total} implies {total // (micro * accum)} processes "
                                f"(micro-batch {micro} x accumulation {accum}); give --gpus or an accelerate config "
                                "to plan them")


def _applicable(out: Combined, task: str, method: str) -> dict[str, Any]:
    """The imported fields the plan's technique and method read; the others (a trainer's gradient
    accumulation where the technique has none) are dropped, named in a warning where they differ from
    the planner's default."""
    from planner.plugins import technique
    from planner.specs import LORA_FIELDS, QLORA_FIELDS, TECHNIQUE_FIELDS, Plan

    plan = out.plan
    try:
        reads = set(technique(task).plan_fields)
    except ValueError:
        return plan  # an unknown task is reported when the plan is built
    dropped = [k for k in plan if (k in TECHNIQUE_FIELDS and k not in reads)
               or (method == "full" and k in LORA_FIELDS + QLORA_FIELDS) or (method == "lora" and k in QLORA_FIELDS)]
    shown = [k for k in dropped if plan[k] != Plan.model_fields[k].default]
    if shown:
        out.warnings.append(f"task {task} ({method}) does not read {', '.join(shown)} from the configs (ignored)")
    return {k: v for k, v in plan.items() if k not in dropped}


# what a fine-tune or a mirror adds to or drops from a base model's hub name (same architecture)
_VARIANT = re.compile(r"(-instruct(-\d+)?|-chat(-hf)?|-it|-hf)$", re.IGNORECASE)


def _base_name(ref: str) -> str:
    name = ref.rsplit("/", 1)[-1].lower()
    name = _VARIANT.sub("", name)
    return name[len("meta-"):] if name.startswith("meta-") else name


def _catalog_model(ref: str, out: Combined) -> str:
    """A hub id the catalog does not list, read as the catalog model of the same base name where exactly
    one has it (an instruct or chat variant, or a mirror: NousResearch/Meta-Llama-3-8B is
    meta-llama/Meta-Llama-3-8B's architecture), with a warning; else the id as given (fit then names
    the close ones)."""
    from planner.models import ModelError, _hub_index, load_model

    try:
        load_model(ref)
        return ref
    except (ModelError, ValueError):
        pass
    if "/" not in ref:
        return ref
    want = _base_name(ref)
    found = sorted({cid for hub, cid in _hub_index().items() if _base_name(hub) == want})
    if len(found) != 1:
        return ref
    out.warnings.append(f"model: {ref} is planned as {found[0]} ({load_model(found[0]).hf_id}, the same base model: "
                        "an instruct or chat variant or a mirror has its architecture); give --model to plan another")
    return found[0]
