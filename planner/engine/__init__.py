"""The memory engine: pure Python, no torch. `estimate(plan, model)` is the entry point."""

from __future__ import annotations

from planner.engine.estimate import estimate

__all__ = ["estimate"]
