"""The length grid that limits and shorter-length suggestions are stated on (planner.length_grid)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from planner import length_grid as g
from planner.api import fit
from planner.specs import Plan


@given(st.integers(0, 1 << 50))
def test_index_and_value_bracket_every_length(v):
    i = g.index_of(v)
    lo, hi = g.value_of(i), g.value_of(i + 1)
    assert lo <= v < hi and g.index_of(lo) == i and g.floor(v) == lo and g.next_above(v) == hi
    # the step is a power of two of at most 1/64 of the value (1 below 128)
    step = hi - lo
    assert step & (step - 1) == 0 and (step == 1 if lo < 128 else step * 64 <= lo)
    c = g.ceil_index(v)
    assert g.value_of(c) >= v and (c == 0 or g.value_of(c - 1) < v)


def test_the_grid_near_familiar_lengths():
    # every integer below 128; steps of 2 from 128, 16 from 1,024, 32 from 2,048, 128 from 8,192
    assert [g.value_of(i) for i in (0, 1, 127, 128, 129)] == [0, 1, 127, 128, 130]
    assert (g.floor(2047), g.floor(2048), g.floor(2079), g.floor(2080)) == (2032, 2048, 2048, 2080)
    assert (g.floor(11_800), g.floor(16_383), g.floor(16_384)) == (11_776, 16_256, 16_384)


def test_a_shorter_length_suggested_is_on_the_grid():
    """A plan whose sequence does not fit gets `--seq N` with N on the grid, and N fits (simulated)."""
    res = fit(Plan(model="llama-3.1-8b", gpu="a100-80gb", method="lora", batch=1, seq=65_536))
    assert not res.fits
    seq = [s for s in res.suggestions if s.change.startswith("--seq ")]
    assert seq, [s.change for s in res.suggestions]
    n = int(seq[0].change.split()[1])
    assert n == seq[0].plan.seq == g.floor(n) and seq[0].fits
