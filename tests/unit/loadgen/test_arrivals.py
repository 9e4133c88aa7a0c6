"""loadgen.arrivals: rates, gamma gaps and trace timestamps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from loadgen.arrivals import parse_rates, send_offsets


def test_parse_rates():
    assert parse_rates("4") == [4.0]
    assert parse_rates("1, 2,inf") == [1.0, 2.0, math.inf]
    for bad in ("0", "-1", "x", "1,,2"):
        with pytest.raises(ValueError):
            parse_rates(bad)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_have_the_rate_and_the_burstiness(burstiness):
    t = np.array(list(itertools.islice(send_offsets(5.0, burstiness, seed=1), 20001)))
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    # gamma(k, θ): coefficient of variation 1/sqrt(k)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_same_seed_same_schedule_and_infinite_rate_sends_at_once():
    a = list(itertools.islice(send_offsets(3.0, 1.0, seed=7), 50))
    assert a == list(itertools.islice(send_offsets(3.0, 1.0, seed=7), 50))
    assert a != list(itertools.islice(send_offsets(3.0, 1.0, seed=8), 50))
    assert list(itertools.islice(send_offsets(math.inf), 5)) == [0.0] * 5


def test_trace_timestamps_repeat_after_the_trace():
    t = list(itertools.islice(send_offsets(1.0, timestamps=[0.0, 1.0, 3.0]), 6))
    assert t[:3] == [0.0, 1.0, 3.0]
    assert t[3] > 3.0 and t[4] - t[3] == pytest.approx(1.0)
