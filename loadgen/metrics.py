"""Summary statistics of a run (pure): the metrics of vLLM's serving benchmark.

- ``completed``: requests that streamed to ``[DONE]`` without an error; ``errors``: all others
  (each kept, with its message, in ``error_kinds`` and in requests.csv).
- Throughputs divide by ``duration_s``, the wall time from the first send to the last end.
  ``request_throughput`` = completed / duration; ``output_throughput`` = output tokens of
  completed requests / duration; ``total_token_throughput`` adds their prompt tokens.
- ``goodput``: completed requests per second that meet every SLO given (``ttft``, ``tpot``,
  ``e2el``, in ms, as vLLM's ``--goodput``), with ``goodput_requests`` (their count) and
  ``slo_ms`` (the SLO). Without an SLO goodput means nothing, so these three are absent.
- Latency statistics (``ttft_ms``, ``tpot_ms``, ``itl_ms``, ``e2el_ms``) are over completed
  requests: mean, std, p50 (the median), p90, p99, min, max. ITL pools the gaps of all
  requests. TPOT is defined only for requests with more than one output token.
- ``by_priority``: the same counts and latency statistics per priority class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from loadgen.client import RequestRecord

SLO_KEYS = ("ttft", "tpot", "e2el")
STAT_KEYS = ("mean", "std", "p50", "p90", "p99", "min", "max")


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft:500,tpot:50"`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    if not text:
        return {}
    slo = {}
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        key, sep, value = part.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}, got {part!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"{key}: not a number of milliseconds: {value!r}") from None
        if not ms > 0:
            raise ValueError(f"{key}: the SLO must be > 0 ms")
        slo[key] = ms
    return slo


def stats_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    v = np.asarray(list(values_s), dtype=float) * 1000.0
    if v.size == 0:
        return dict.fromkeys(STAT_KEYS)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "p50": float(np.percentile(v, 50)),
        "p90": float(np.percentile(v, 90)),
        "p99": float(np.percentile(v, 99)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    if not rec.ok:
        return False
    values = {"ttft": rec.ttft, "tpot": rec.tpot, "e2el": rec.latency}
    for key, limit_ms in slo.items():
        value = values[key]
        if value is not None and value * 1000.0 > limit_ms:
            return False
    return True


def _latencies(recs: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in recs if r.ok]
    return {
        "ttft_ms": stats_ms(r.ttft for r in ok if r.ttft is not None),
        "tpot_ms": stats_ms(r.tpot for r in ok if r.tpot is not None),
        "itl_ms": stats_ms(gap for r in ok for gap in r.itl),
        "e2el_ms": stats_ms(r.latency for r in ok if r.latency is not None),
    }


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo: dict[str, float] | None = None
) -> dict[str, Any]:
    slo = slo or {}
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = max(duration_s, 1e-9)
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    good = sum(meets_slo(r, slo) for r in ok)
    goodput = {"goodput": good / duration, "goodput_requests": good, "slo_ms": dict(slo)}
    summary: dict[str, Any] = {
        "completed": len(ok),
        "errors": len(failed),
        "total_requests": len(records),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        **(goodput if slo else {}),
        "error_kinds": dict(Counter(_kind(r.error) for r in failed if r.error)),
        **_latencies(records),
    }
    classes = sorted({r.priority for r in records if r.priority is not None})
    summary["by_priority"] = {
        str(c): {
            "completed": sum(r.ok for r in records if r.priority == c),
            "errors": sum(not r.ok for r in records if r.priority == c),
            **_latencies([r for r in records if r.priority == c]),
        }
        for c in classes
    }
    return summary


def _kind(error: str) -> str:
    """Group error messages: the status or exception name and the start of the message."""
    return error.split(":", 1)[0] if error.startswith(("HTTP", "stream error")) else error[:60]
