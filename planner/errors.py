"""Errors a user can cause, and helpers that make their messages one helpful line.

Every error the CLI reports as bad input (exit 2) is a `ValueError` whose message is already a
single line that names the thing at fault ("batch: must be > 0 (got 0)"). Catalogs add close
matches ("unknown gpu 'h10' (did you mean: h100-sxm, h100-pcie?)").
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PlannerInputError(ValueError):
    """Base class of the planner's own bad-input errors (message: one line)."""


class PlanError(PlannerInputError):
    """A plan that cannot be built: unknown key, invalid value, option that does not apply."""


class GPUError(PlannerInputError):
    """Unknown GPU id or an unusable custom card."""


def close_matches(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.75) -> list[str]:
    """Close matches of `word` among `choices`, best first: ids it starts (`a100` -> `a100-80gb`),
    then difflib's closest spellings (`lora_rnk` -> `lora_rank`)."""
    choices = list(choices)
    low = word.strip().lower()
    if not low:
        return []
    found = [c for c in choices if c.lower().startswith(low)]
    for c in difflib.get_close_matches(low, choices, n=n, cutoff=cutoff):
        if c not in found:
            found.append(c)
    return found[:n]


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' or '' when nothing is close."""
    found = close_matches(word, choices, n=n)
    return f" (did you mean: {', '.join(found)}?)" if found else ""


def one_line(text: str) -> str:
    """Collapse whitespace/newlines so a message fits on one line."""
    return " ".join(str(text).split())
