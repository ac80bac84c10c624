"""The hooks a planner plugin implements (pluggy). Built-in features use exactly these hooks.

A plugin is a module (or object) with functions decorated by `planner.hookimpl`, registered through
the entry-point group `planner`:

    # pyproject.toml of a third-party plugin
    [project.entry-points.planner]
    my_plugin = "my_package.my_module"

Each `register_<things>(register)` hook receives a callable; the plugin calls `register(obj)` once
per thing it adds, and the core looks things up by name. Registering a name twice is an error that
names both plugins.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("planner")
hookimpl = pluggy.HookimplMarker("planner")


@hookspec
def register_techniques(register: Callable[[Any], None]) -> None:
    """Add techniques (`planner.technique.Technique` objects).

    A technique has a `name` (what `--task` selects), a `kind` (alignment, adaptation, compression,
    serving, training, inference), `workload(plan, model)` describing what runs (models and their
    roles, the phases of a step) for the engine to turn into bytes, and `step(ctx)`: the program a
    backend executes, the same code on real and on fake tensors.
    """


@hookspec
def register_models(register: Callable[[str, dict], None]) -> None:
    """Add model configs: `register(id, config)`, `config` being a Hugging Face config.json dict
    (with an optional "_planner": {"name", "hf_id", "source"} entry)."""


@hookspec
def register_hardware(register: Callable[[Any], None]) -> None:
    """Add accelerators: `register(GPUSpec(...))` (`planner.gpus.GPUSpec`)."""


@hookspec
def register_optimizers(register: Callable[[Any], None]) -> None:
    """Add optimizers (`planner.engine.optimizers.OptimizerModel`): the state bytes they keep per
    trainable tensor and the transient bytes of `step()`, and how a backend builds them."""


@hookspec
def register_commands(commands: dict[str, Any]) -> None:
    """Add CLI sub-commands: `commands[name] = (help, add_arguments(parser), run(args, out, err) -> int)`."""
