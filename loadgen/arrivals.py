"""When each request is sent: Poisson / gamma arrivals, all at once, or a trace's timestamps.

:func:`send_offsets` yields the send time of request ``k`` in seconds after the start of the
run, lazily and without end; the runner stops it with ``--num-requests`` and ``--duration``.
The first request is sent at 0. Gaps are gamma distributed with shape ``burstiness`` and mean
``1/rate``: burstiness 1 is Poisson, below 1 burstier, above 1 smoother (vLLM's definition).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np


def parse_rates(text: str) -> list[float]:
    """``"inf"``, ``"4"`` or a sweep ``"1,2,4,8"`` -> request rates (req/s, > 0)."""
    rates = []
    for part in text.split(","):
        part = part.strip()
        try:
            rate = math.inf if part.lower() in ("inf", "infinity") else float(part)
        except ValueError:
            raise ValueError(f"not a number: {part!r}") from None
        if not rate > 0:
            raise ValueError(f"rates must be > 0, got {part!r}")
        rates.append(rate)
    if not rates:
        raise ValueError("no rate given")
    return rates


def send_offsets(
    rate: float, burstiness: float = 1.0, seed: int = 0, timestamps: Sequence[float] | None = None
) -> Iterator[float]:
    """Send offsets in seconds. ``timestamps`` (a trace's, from 0) win over ``rate``; past
    the trace's end the trace repeats, shifted by its span plus one mean gap."""
    if timestamps is not None:
        span = (max(timestamps) if timestamps else 0.0) + (
            (max(timestamps) / max(len(timestamps) - 1, 1)) if timestamps else 0.0
        )
        shift = 0.0
        while True:
            for t in timestamps:
                yield shift + t
            shift += span if span > 0 else 1.0
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    if math.isinf(rate):
        while True:
            yield 0.0
    rng = np.random.default_rng(seed + 1)
    t = 0.0
    while True:
        yield t
        t += float(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
