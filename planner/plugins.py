"""The plugin manager: built-in plugins (`planner_plugins`, the repo's `plugins/` folder) and
third-party plugins from the entry-point group `planner`, registered the same way.

Built-ins load on first use. Entry points are scanned only when a name is not found among what is
already registered, or when everything is listed (`planner plugins`): scanning installed
distributions costs about 50 ms, a tenth of the CLI's start-up budget. A plugin that fails to import
or to register produces one warning naming it; the others keep working.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from planner import hookspecs

ENTRY_POINT_GROUP = "planner"
BUILTIN_PLUGINS: tuple[str, ...] = ("planner_plugins.training", "planner_plugins.generation",
                                    "planner_plugins.alignment", "planner_plugins.rl", "planner_plugins.distillation")


class PluginError(ValueError):
    pass


@dataclass
class PluginInfo:
    name: str
    version: str
    source: str  # "built-in" or the distribution name
    registers: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Registry:
    techniques: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    optimizers: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, Any] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    scanned: bool = False


_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None


def _manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        _pm = pluggy.PluginManager("planner")
        _pm.add_hookspecs(hookspecs)
    return _pm


def registry(scan: bool = False) -> Registry:
    """What the loaded plugins registered; `scan=True` also loads third-party entry points."""
    global _registry
    if _registry is None:
        _registry = Registry()
        for modname in BUILTIN_PLUGINS:
            _load(_registry, modname, lambda m=modname: importlib.import_module(m), "built-in")
    if scan and not _registry.scanned:
        _registry.scanned = True
        _scan_entry_points(_registry)
    return _registry


def reset() -> None:
    """Forget every loaded plugin (tests; a later call loads the built-ins again)."""
    global _pm, _registry
    _pm = None
    _registry = None


def _scan_entry_points(reg: Registry) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        source = f"{dist.name} {dist.version}" if dist is not None else "entry point"
        _load(reg, ep.name, ep.load, source)


def register_plugin(obj: Any, name: str | None = None) -> PluginInfo | None:
    """Register a plugin object or module directly (tests, notebooks)."""
    reg = registry()
    return _load(reg, name or getattr(obj, "__name__", repr(obj)), lambda: obj, "registered")


def unregister_plugin(name: str) -> None:
    """Forget a plugin registered by name and everything it registered."""
    reg = registry()
    pm = _manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    for (kind, item), owner in list(reg.owners.items()):
        if owner == name:
            getattr(reg, kind).pop(item, None)
            del reg.owners[(kind, item)]
    reg.plugins = [p for p in reg.plugins if p.name != name]


def _load(reg: Registry, name: str, loader, source: str) -> PluginInfo | None:
    pm = _manager()
    try:
        obj = loader()
        if pm.get_plugin(name) is not None or pm.is_registered(obj):
            return None
        pm.register(obj, name=name)
        info = PluginInfo(name=name, version=str(getattr(obj, "__version__", "") or _dist_version(source)),
                          source=source)
        _collect(reg, pm, obj, name, info)
    except Exception as e:  # noqa: BLE001 - a broken plugin must not break the others
        try:
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
        except Exception:  # noqa: BLE001
            pass
        warnings.warn(f"planner: plugin '{name}' failed to load and is skipped: {type(e).__name__}: {e}",
                      stacklevel=2)
        return None
    reg.plugins.append(info)
    return info


def _dist_version(source: str) -> str:
    parts = source.rsplit(" ", 1)
    return parts[1] if len(parts) == 2 else ""


def _collect(reg: Registry, pm: pluggy.PluginManager, obj: Any, name: str, info: PluginInfo) -> None:
    """Call this plugin's register_* hooks only (others already ran) and record what it adds."""
    def adder(kind: str, key_of):
        def register(*args):
            item = args if len(args) > 1 else args[0]
            key = key_of(item)
            table = getattr(reg, kind)
            if key in table:
                raise PluginError(f"{kind[:-1]} '{key}' is already registered by plugin '{reg.owners[(kind, key)]}'")
            table[key] = item[1] if kind == "models" else item
            reg.owners[(kind, key)] = name
            info.registers.setdefault(kind, []).append(key)
            if kind == "techniques" and hasattr(item, "plugin") and not item.plugin:
                object.__setattr__(item, "plugin", name)
        return register

    hooks = {
        "register_techniques": adder("techniques", lambda t: t.name),
        "register_models": adder("models", lambda item: item[0]),
        "register_hardware": adder("hardware", lambda g: g.id),
        "register_optimizers": adder("optimizers", lambda o: o.name),
    }
    for hook_name, register in hooks.items():
        impl = getattr(obj, hook_name, None)
        if impl is not None:
            impl(register=register)
    impl = getattr(obj, "register_commands", None)
    if impl is not None:
        before = set(reg.commands)
        impl(commands=reg.commands)
        for key in set(reg.commands) - before:
            reg.owners[("commands", key)] = name
            info.registers.setdefault("commands", []).append(key)


def technique(name: str):
    """The technique `--task name` selects; unknown names raise with close matches."""
    reg = registry()
    if name not in reg.techniques:
        reg = registry(scan=True)
    if name not in reg.techniques:
        import difflib

        known = sorted(reg.techniques)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean: {', '.join(close)}?" if close else f"choose from {', '.join(known)}"
        raise PluginError(f"task: unknown technique '{name}' ({hint})")
    return reg.techniques[name]


def technique_names() -> list[str]:
    return sorted(registry().techniques)
