"""loadgen.metrics: vLLM's definitions of TTFT, TPOT, ITL, E2E, throughput and goodput."""

from __future__ import annotations

import pytest

from loadgen.client import RequestRecord
from loadgen.metrics import parse_slo, summarize


def rec(i, ttft, latency, out, itl=(), prio=None, error=None, prompt=10):
    r = RequestRecord(i, prio, prompt, out, start=0.1 * i, ttft=ttft, latency=latency,
                      output_len=out, itl=list(itl), error=error)  # fmt: skip
    return r


def test_tpot_is_decode_time_over_tokens_after_the_first():
    r = rec(0, 0.2, 1.2, 11)
    assert r.tpot == pytest.approx(0.1)
    assert rec(1, 0.2, 0.2, 1).tpot is None  # one token: undefined
    assert rec(2, 0.2, 1.2, 11, error="HTTP 500: x").tpot is None


def test_summary_counts_throughput_and_percentiles():
    records = [rec(i, 0.1 * (i + 1), 1.0 + i, 5, itl=[0.01 * (i + 1)] * 4) for i in range(10)]
    records.append(rec(10, None, None, 0, error="HTTP 400: too long"))
    s = summarize(records, duration_s=20.0)
    assert s["completed"] == 10 and s["errors"] == 1 and s["total_requests"] == 11
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(50 / 20)
    assert s["total_token_throughput"] == pytest.approx((50 + 100) / 20)
    assert s["ttft_ms"]["mean"] == pytest.approx(550.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(550.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(991.0)
    assert s["e2el_ms"]["max"] == pytest.approx(10_000.0)
    assert s["itl_ms"]["mean"] == pytest.approx(55.0)  # pooled over all gaps
    assert s["error_kinds"] == {"HTTP 400": 1}
    assert not {"goodput", "goodput_requests", "slo_ms"} & set(s)  # no SLO: no goodput


def test_goodput_counts_only_requests_meeting_every_slo():
    records = [rec(0, 0.1, 1.1, 11), rec(1, 0.9, 1.9, 11), rec(2, 0.1, 5.1, 11)]
    # tpot: 0.1, 0.1, 0.5 s
    s = summarize(records, 10.0, parse_slo("ttft:500,tpot:200"))
    assert s["goodput_requests"] == 1 and s["goodput"] == pytest.approx(0.1)
    s = summarize(records, 10.0, parse_slo("e2el:2000"))
    assert s["goodput_requests"] == 2


def test_breakdown_by_priority_class():
    records = [rec(0, 0.1, 1.0, 3, prio=0), rec(1, 0.3, 2.0, 3, prio=1),
               rec(2, None, None, 0, prio=1, error="timeout after 5 s")]  # fmt: skip
    s = summarize(records, 3.0)
    assert s["by_priority"]["0"]["completed"] == 1
    assert s["by_priority"]["1"]["completed"] == 1 and s["by_priority"]["1"]["errors"] == 1
    assert s["by_priority"]["1"]["ttft_ms"]["mean"] == pytest.approx(300.0)


def test_empty_run_has_null_statistics():
    s = summarize([rec(0, None, None, 0, error="x")], 1.0)
    assert s["completed"] == 0 and s["ttft_ms"]["p50"] is None


@pytest.mark.parametrize("bad", ["ttft", "foo:1", "ttft:abc", "tpot:-5", "ttft:0"])
def test_bad_slo_is_refused(bad):
    with pytest.raises(ValueError):
        parse_slo(bad)
