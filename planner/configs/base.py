"""What every config format shares: the file loaded as a mapping, a reader that consumes keys and
names the ones left over, and the imported settings (plan fields, layout fields, warnings).

A reader turns one tool's file into the planner's own settings. Every key it reads is consumed;
keys known to change neither memory nor time (logging, saving, data, learning rate...) are consumed
silently; every other key left over is named in one warning per file ("not modelled, ignored"), so
nothing is dropped silently. A value the planner cannot take is a `ConfigError`: one line naming the
file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import PlanError, did_you_mean, one_line


class ConfigError(PlanError):
    """A tool's config file the planner cannot read (message: one line naming the file and key)."""


@dataclass
class Imported:
    """Settings read from one file: Plan fields, Layout fields, and warnings (one line each)."""

    source: str
    format: str
    plan: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Plan fields a file implies without stating them (accelerate's mixed_precision, DeepSpeed's bf16):
    # used where no file states the field, else checked against it (planner.configs.merge)
    weak: dict[str, Any] = field(default_factory=dict)
    # figures the tool checks against the rest (DeepSpeed's train_batch_size)
    checks: dict[str, int] = field(default_factory=dict)
    # other files this one names (accelerate's deepspeed_config_file, a trainer's deepspeed key)
    includes: list[tuple[str, Path]] = field(default_factory=list)


def load_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The file as a mapping (YAML, or JSON for .json); ConfigError on any problem (`what` the file is,
    in the messages: a config file, a plan file)."""
    p = Path(path)
    name = str(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, not a {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: cannot read: {one_line(getattr(e, 'strerror', None) or e)}") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{name}: invalid YAML{where}: {one_line(getattr(e, 'problem', None) or e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: a {what} must be a mapping of settings (key: value), got {type(data).__name__}")
    return data


class Reader:
    """Reads keys from one mapping, remembering which were read; `leftover()` names the rest.

    `prefix` names a nested section in messages (`fsdp_config.fsdp_sharding_strategy`)."""

    def __init__(self, data: dict[str, Any], name: str, prefix: str = "", skip: frozenset[str] = frozenset()) -> None:
        self.data = data
        self.name = name
        self.prefix = prefix
        self.used: set[str] = set()
        # keys whose field a flag or the plan file gives: not read (a value the planner cannot take is no error)
        self.skip = skip

    def where(self, key: str) -> str:
        return f"{self.name}: {self.prefix}{key}"

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key not in self.skip and key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        v = None if key in self.skip else self.data.get(key)
        return default if v is None else v

    def auto(self, key: str) -> bool:
        """The key holds "auto" (DeepSpeed and accelerate: filled in from the trainer's arguments)."""
        return isinstance(self.data.get(key), str) and self.data[key].strip().lower() == "auto"

    def boolean(self, key: str, default: bool | None = None) -> bool | None:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no"):
            return v.strip().lower() in ("true", "yes")
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        raise self.error(key, f"must be true or false (got {v!r})")

    def integer(self, key: str, default: int | None = None, minimum: int = 1) -> int | None:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, str, float)):
            raise self.error(key, f"must be a whole number (got {v!r})")
        try:
            n = int(v) if not isinstance(v, float) or v.is_integer() else None
        except ValueError:
            n = None
        if n is None:
            raise self.error(key, f"must be a whole number (got {v!r})")
        if n < minimum:
            raise self.error(key, f"must be >= {minimum} (got {n})")
        return n

    def number(self, key: str, default: float | None = None) -> float | None:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool):
            raise self.error(key, f"must be a number (got {v!r})")
        try:
            return float(v)
        except (TypeError, ValueError):
            raise self.error(key, f"must be a number (got {v!r})") from None

    def text(self, key: str, default: str | None = None) -> str | None:
        v = self.raw(key)
        if v is None:
            return default
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise self.error(key, f"must be a string (got {v!r})")
        return str(v)

    def choice(self, key: str, table: dict[str, Any], default: Any = None) -> Any:
        """The planner's value for the key's value, by `table` (case-insensitive); an unknown value is an
        error naming the values the planner models."""
        v = self.text(key)
        if v is None:
            return default
        low = {str(k).lower(): val for k, val in table.items()}
        if v.strip().lower() not in low:
            known = list(table)
            raise self.error(key, f"'{v}' is not modelled{did_you_mean(v, known) or ''} (modelled: {', '.join(known)}; "
                                  "a flag for this setting overrides the file)")
        return low[v.strip().lower()]

    def section(self, key: str) -> "Reader | None":
        """A nested mapping as a Reader of its own (None when absent)."""
        v = self.raw(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.error(key, f"must be a mapping (got {type(v).__name__})")
        return Reader(v, self.name, f"{self.prefix}{key}.")

    def consume(self, *keys: str) -> None:
        """Keys read elsewhere or known to change neither memory nor time."""
        self.used.update(keys)

    def leftover(self, silent: frozenset[str] = frozenset()) -> list[str]:
        """Keys neither read nor known to change nothing (with this reader's prefix)."""
        return [f"{self.prefix}{k}" for k in self.data if k not in self.used and k not in silent]


def not_modelled(name: str, keys: list[str]) -> list[str]:
    """One warning naming the keys a file sets that the planner does not model."""
    if not keys:
        return []
    return [f"{name}: not modelled, ignored (they may change memory or time): {', '.join(keys)}"]


def skipped(given: "set[str] | None", stated_by: dict[str, tuple[str, ...]]) -> frozenset[str]:
    """The keys of the fields a flag or the plan file gives (`stated_by`: field -> keys)."""
    return frozenset(k for f in (given or ()) for k in stated_by.get(f, ()))
