"""Prefix-cache figures in the router's /metrics: per worker from its stats, and the hit
rates over all workers."""

from __future__ import annotations

from router.metrics import PREFIX_CACHE_GAUGES, RouterMetrics


def _stats(q, h, qt, ht, cached):
    return {
        "prefix_cache_queries": q,
        "prefix_cache_hits": h,
        "prefix_cache_query_tokens": qt,
        "prefix_cache_hit_tokens": ht,
        "prefix_cache_hit_rate": ht / qt if qt else 0.0,
        "kv_cached_blocks": cached,
        "kv_cache_evictions": 3,
    }


def test_prefix_cache_metrics_per_worker_and_in_total():
    text = RouterMetrics().render({"w0": _stats(4, 3, 400, 300, 12), "w1": _stats(4, 0, 200, 0, 5)})
    lines = set(text.splitlines())
    assert 'tandem_worker_prefix_cache_hit_tokens_total{worker="w0"} 300' in lines
    assert 'tandem_worker_prefix_cache_hit_tokens_total{worker="w1"} 0' in lines
    assert 'tandem_worker_kv_cached_blocks{worker="w0"} 12' in lines
    assert 'tandem_worker_kv_cache_evictions_total{worker="w1"} 3' in lines
    assert "# TYPE tandem_worker_kv_cache_evictions_total counter" in lines
    assert "# TYPE tandem_worker_prefix_cache_hit_rate gauge" in lines
    assert "tandem_prefix_cache_hit_rate 0.5" in lines  # 300 of 600 prompt tokens
    assert "tandem_prefix_cache_request_hit_rate 0.375" in lines  # 3 of 8 requests


def test_no_workers_no_division_by_zero():
    text = RouterMetrics().render({})
    assert "tandem_prefix_cache_hit_rate 0.0" in text.splitlines()


def test_every_worker_stat_key_has_a_metric():
    from tandem.config import CacheConfig, SchedulerConfig
    from tandem.sched.scheduler import Scheduler

    keys = set(Scheduler(SchedulerConfig(), CacheConfig(num_host_blocks=4)).cache_stats())
    assert keys - set(PREFIX_CACHE_GAUGES) == {"prefix_caching"}  # a flag, not a metric


def test_alise_prediction_error_is_exported():
    text = RouterMetrics().render(
        {"w0": {"up": 1, "predictions_scored": 3, "prediction_relative_error": 0.25}}
    )
    assert 'tandem_worker_predictions_scored_total{worker="w0"} 3' in text
    assert 'tandem_worker_prediction_relative_error{worker="w0"} 0.25' in text
