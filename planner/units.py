"""Byte sizes: parse what users type, format what the planner prints.

Rules (one convention everywhere):
- binary units are powers of two: KiB = 2**10, MiB = 2**20, GiB = 2**30, TiB = 2**40;
- decimal units are powers of ten: kB/KB = 1e3, MB = 1e6, GB = 1e9, TB = 1e12;
- a bare number (int, or a string of digits, optionally with a trailing "B") is bytes;
- a bare letter ("24G", "24g", "80M") is refused as ambiguous: tools disagree on it (docker and
  PyTorch's allocator read it as GiB, disk vendors as GB), and 24 GiB vs 24 GB differ by 7%,
  more than most headrooms. Write GiB or GB.
Units are matched case-insensitively ("24gib" works); a space between number and unit is fine;
fractions round to the nearest byte ("23.5GiB").

The planner prints memory in GiB with two decimals ("79.25 GiB"), the unit torch uses in its
out-of-memory messages, so a figure can be compared with one seen on a card.
"""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_AMBIGUOUS = {"k", "m", "g", "t"}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


class SizeError(ValueError):
    """A size string that cannot be read; the message is one line."""


def parse_size(value: str | int | float) -> int:
    """Bytes from "24GiB", "24 GB", "150109880320", 24 * 2**30 ... (see the module rules)."""
    if isinstance(value, bool):
        raise SizeError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise SizeError(f"size must be > 0 (got {value})")
        return value
    if isinstance(value, float):
        if value <= 0 or value != value:
            raise SizeError(f"size must be > 0 (got {value})")
        return int(round(value))
    if not isinstance(value, str):
        raise SizeError(f"not a size: {value!r}")
    m = _SIZE_RE.match(value)
    if not m:
        raise SizeError(f"not a size: {value!r} (write e.g. 24GiB, 24GB or a number of bytes)")
    number, unit = m.group(1), m.group(2).lower()
    if unit in _AMBIGUOUS:
        raise SizeError(
            f"ambiguous size unit in {value!r}: write {m.group(1)}{unit.upper()}iB (2^{_pow2(unit)}) "
            f"or {m.group(1)}{unit.upper()}B (10^{_pow10(unit)})"
        )
    if unit not in _UNITS:
        raise SizeError(f"unknown size unit {m.group(2)!r} in {value!r} (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")
    nbytes = int(round(float(number) * _UNITS[unit]))
    if nbytes <= 0:
        raise SizeError(f"size must be > 0 (got {value!r})")
    return nbytes


def _pow2(letter: str) -> int:
    return {"k": 10, "m": 20, "g": 30, "t": 40}[letter]


def _pow10(letter: str) -> int:
    return {"k": 3, "m": 6, "g": 9, "t": 12}[letter]


def gib(nbytes: int | float) -> float:
    """Bytes as GiB (float)."""
    return nbytes / GiB


def format_gib(nbytes: int | float, signed: bool = False) -> str:
    """'12.34 GiB' (two decimals, labelled); signed=True prints '+1.00 GiB' / '-1.00 GiB'."""
    value = nbytes / GiB
    if abs(value) >= 1e9:  # beyond an exabyte (a batch of 10^12 asked for): digits say nothing
        return f"{value:+.3e} GiB" if signed else f"{value:.3e} GiB"
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return f"{text} GiB"


def format_count(n: int | float) -> str:
    """Large counts the way model cards write them: 8.03B, 494.03M, 12.5K."""
    n = float(n)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"
