"""A technique: what a plugin registers through `register_techniques`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from planner.architecture import ModelSpec
    from planner.specs import Plan
    from planner.workload import Workload

KINDS: tuple[str, ...] = ("training", "inference", "alignment", "adaptation", "compression", "serving")


@dataclass(frozen=True)
class Technique:
    """name: what `--task` selects. workload(plan, model): what runs (see planner.workload).
    step: the program the backends execute, `step(ctx)`, with `ctx` a `planner.backends.StepContext`
    (real or fake tensors: the same code). plan_fields: the Plan fields the technique reads, so that
    options it would ignore are rejected."""

    name: str
    kind: str
    description: str
    workload: Callable[["Plan", "ModelSpec"], "Workload"]
    step: Callable[[Any], Any] | None = None
    plan_fields: tuple[str, ...] = ()
    plugin: str = field(default="", compare=False)
