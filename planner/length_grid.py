"""The values a length limit is stated at: a power-of-two step of at most 1/64 of the value.

`planner fit`'s "longest sequence" (and prompt, new tokens) and its suggestions of a shorter length
name a value of this grid: every integer below 128, then 64 values per octave (128, 130, ... 254;
256, 260, ... 508; ...; 8,192, 8,320, ... 16,256: a step of 128 tokens there). A limit on the grid is
at most 1/64 (1.6%) below the exact longest length that fits, less than the estimate's own error
against real runs (reserved within 3% median), and a bisection over the grid needs about six fewer
simulated steps than one over every integer (each a replay of the step's allocation trace, tens of ms
for an 8B model). The grid is a float with a 7-bit significand: value(i) for index i is

    i                                  for i < 128
    2^k + j * 2^(k - 6)                for i = 128 + 64 * (k - 7) + j, 0 <= j < 64, k >= 7
"""

from __future__ import annotations

SIGNIFICAND_BITS = 6  # 64 values per octave: a step of at most 1/64 of the value
_EXACT_BELOW = 1 << (SIGNIFICAND_BITS + 1)  # 128: every integer below is on the grid
_PER_OCTAVE = 1 << SIGNIFICAND_BITS


def index_of(v: int) -> int:
    """The index of the largest grid value <= v (v >= 0)."""
    if v < _EXACT_BELOW:
        return max(v, 0)
    k = v.bit_length() - 1
    j = (v - (1 << k)) >> (k - SIGNIFICAND_BITS)
    return _EXACT_BELOW + _PER_OCTAVE * (k - SIGNIFICAND_BITS - 1) + j


def value_of(i: int) -> int:
    """The grid value at index i (i >= 0)."""
    if i < _EXACT_BELOW:
        return max(i, 0)
    octave, j = divmod(i - _EXACT_BELOW, _PER_OCTAVE)
    k = octave + SIGNIFICAND_BITS + 1
    return (1 << k) + (j << (k - SIGNIFICAND_BITS))


def floor(v: int) -> int:
    """The largest grid value <= v."""
    return value_of(index_of(v))


def next_above(v: int) -> int:
    """The smallest grid value > v: a limit's next step, which does not fit."""
    return value_of(index_of(v) + 1)


def ceil_index(v: int) -> int:
    """The index of the smallest grid value >= v."""
    i = index_of(v)
    return i if value_of(i) >= v else i + 1
