"""Continuous vs static batching on transformers' real CPU engines, and the simulator's prediction of both.

The comparison is by forward passes and padded tokens (not wall time). The fast test runs the
8-request mixed trace (about 5-10 s on two cores); the 32-request one is `slow`.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("torch", reason="torch is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")
pytest.importorskip("transformers", reason="transformers is not installed (the backends extra: pip install torch==2.13.0 && pip install -e '.[backends]')")

from planner.backends.serving import MIXED_OUTPUTS, MIXED_PROMPTS, compare  # noqa: E402


def check(c):
    cont, stat = c.continuous, c.static
    assert cont.outputs_ok and stat.outputs_ok
    assert cont.useful_tokens == stat.useful_tokens == sum(c.prompt_tokens) + sum(o - 1 for o in c.output_tokens)
    # continuous batching: no padding, fewer forward passes than padded static batches of the same size
    assert cont.padded_tokens == 0 and cont.tokens == cont.useful_tokens
    assert stat.padded_tokens > 0
    assert cont.forwards < stat.forwards
    # the simulator predicts both engines exactly
    assert c.simulated_continuous["forwards"] == cont.forwards
    assert c.simulated_continuous["padded_tokens"] == cont.padded_tokens
    assert c.simulated_static["forwards"] == stat.forwards
    assert c.simulated_static["padded_tokens"] == stat.padded_tokens


def test_continuous_beats_static_on_the_real_engines():
    c = compare(MIXED_PROMPTS, MIXED_OUTPUTS, max_batch_tokens=128, max_requests=4)
    check(c)
    # static: batches of 4 run to their longest output (30 and 40): 70 forwards
    assert c.static.forwards == max(MIXED_OUTPUTS[:4]) + max(MIXED_OUTPUTS[4:])


@pytest.mark.slow
def test_continuous_beats_static_on_a_longer_random_trace():
    rng = random.Random(5)
    prompts = [rng.choice((4, 16, 64, 128)) + rng.randrange(8) for _ in range(32)]
    outputs = [rng.choice((2, 8, 32, 64)) + rng.randrange(8) for _ in range(32)]
    check(compare(prompts, outputs, max_batch_tokens=96, max_requests=8))
