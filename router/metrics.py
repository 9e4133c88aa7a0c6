"""Prometheus text exposition for the router (pure; no client library needed).

Names start with ``tandem_``. Histograms use fixed latency buckets (seconds).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.protocol import Migrated

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SHORT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BLOCK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Histogram:
    def __init__(
        self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {count}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.total}')
        lines.append(f"{self.name}_sum {self.sum}")
        lines.append(f"{self.name}_count {self.total}")
        return lines


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = defaultdict(int)  # outcome -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.reruns = 0  # requests continued on another worker after theirs died
        self.prefix_dispatches = 0  # sent to a worker holding part of their prompt cached
        self.ttft = Histogram("tandem_request_ttft_seconds", "Time to first token")
        self.tpot = Histogram(
            "tandem_request_tpot_seconds", "Time per output token after the first"
        )
        self.e2e = Histogram("tandem_request_e2e_seconds", "End-to-end request latency (JCT)")
        self.migrations = defaultdict(int)  # started / committed / aborted
        self.migration_seconds = Histogram(
            "tandem_migration_seconds", "Seconds per committed migration (first stage to DONE)"
        )
        self.migration_downtime = Histogram(
            "tandem_migration_downtime_seconds",
            "Seconds a migrated request was out of every batch (stop-and-copy to DONE)",
            SHORT_BUCKETS,
        )
        self.migration_blocks = Histogram(
            "tandem_migration_blocks", "KV blocks moved per committed migration", BLOCK_BUCKETS
        )

    def observe_migration(self, msg: Migrated) -> None:
        """A committed migration's figures (the source's ``Migrated`` message)."""
        self.migrations["committed"] += 1
        self.migration_seconds.observe(float(msg.seconds))
        self.migration_downtime.observe(float(msg.downtime_s))
        self.migration_blocks.observe(float(msg.blocks))

    def render(self, workers: dict[str, dict], queue_lengths: dict[int, int] | None = None) -> str:
        lines = [
            "# HELP tandem_requests_total Requests by outcome",
            "# TYPE tandem_requests_total counter",
        ]
        for outcome in ("stop", "length", "abort", "error", "rejected"):
            lines.append(f'tandem_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
        lines += [
            "# TYPE tandem_prompt_tokens_total counter",
            f"tandem_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE tandem_generation_tokens_total counter",
            f"tandem_generation_tokens_total {self.generation_tokens}",
            "# HELP tandem_router_reruns_total Requests continued on another worker after theirs died",
            "# TYPE tandem_router_reruns_total counter",
            f"tandem_router_reruns_total {self.reruns}",
            "# HELP tandem_router_prefix_dispatches_total Requests dispatched to a worker "
            "that holds part of their prompt cached (cache-aware dispatch)",
            "# TYPE tandem_router_prefix_dispatches_total counter",
            f"tandem_router_prefix_dispatches_total {self.prefix_dispatches}",
        ]
        lines += [
            "# HELP tandem_router_migrations_total Live migrations by outcome",
            "# TYPE tandem_router_migrations_total counter",
        ]
        for outcome in ("started", "committed", "aborted"):
            lines.append(
                f'tandem_router_migrations_total{{outcome="{outcome}"}} {self.migrations[outcome]}'
            )
        for h in (self.ttft, self.tpot, self.e2e, self.migration_seconds,
                  self.migration_downtime, self.migration_blocks):  # fmt: skip
            lines += h.render()
        lines += [
            "# HELP tandem_router_queue_length Requests waiting for admission, per MLFQ level",
            "# TYPE tandem_router_queue_length gauge",
        ]
        for level, n in sorted((queue_lengths or {}).items()):
            lines.append(f'tandem_router_queue_length{{level="{level}"}} {n}')
        gauges = {
            "up": (
                "tandem_worker_up",
                "1 while the router is connected to the worker; 0 while not (and then the "
                "worker's other series are absent)",
            ),
            "kv_free": ("tandem_worker_kv_blocks_free", "Free KV blocks per worker"),
            "kv_used": ("tandem_worker_kv_blocks_used", "Used KV blocks per worker"),
            "running": ("tandem_worker_running_requests", "Running requests per worker"),
            "waiting": ("tandem_worker_waiting_requests", "Waiting requests per worker"),
            "swapped": ("tandem_worker_swapped_requests", "Requests swapped to host per worker"),
            "preemptions": ("tandem_worker_preemptions_total", "Preemptions per worker"),
            "predictions_scored": (
                "tandem_worker_predictions_scored_total",
                "Finished requests whose arrival-time output-length prediction was scored (alise)",
            ),
            "prediction_relative_error": (
                "tandem_worker_prediction_relative_error",
                "Mean |predicted - true| / true output length over scored requests (alise)",
            ),
            "swapped_out_blocks": (
                "tandem_worker_swapped_out_blocks_total",
                "Blocks swapped out per worker",
            ),
            "swapped_in_blocks": (
                "tandem_worker_swapped_in_blocks_total",
                "Blocks swapped in per worker",
            ),
            "swapped_out_bytes": (
                "tandem_worker_swapped_out_bytes_total",
                "Bytes written to the host KV tier per worker",
            ),
            "swapped_in_bytes": (
                "tandem_worker_swapped_in_bytes_total",
                "Bytes read back from the host KV tier per worker",
            ),
            "proactive_swap_outs": (
                "tandem_worker_proactive_swap_outs_total",
                "Requests offloaded to host under the free-block watermark",
            ),
            "swap_prefetches": (
                "tandem_worker_swap_prefetches_total",
                "Swapped requests brought back ahead of their turn",
            ),
            "swap_in_wait_seconds": (
                "tandem_worker_swap_in_wait_seconds_total",
                "Seconds the decode loop waited for swap-ins to land",
            ),
            "swap_out_wait_seconds": (
                "tandem_worker_swap_out_wait_seconds_total",
                "Seconds the decode loop waited for swap-outs",
            ),
            "handoffs_ok": (
                "tandem_worker_kv_handoffs_total",
                "KV handoffs sent (prefill workers)",
            ),
            "handoffs_failed": (
                "tandem_worker_kv_handoffs_failed_total",
                "KV handoffs that fell back to local decode",
            ),
            "kv_in_transfers": (
                "tandem_worker_kv_received_total",
                "KV handoffs received (decode workers)",
            ),
            "kv_in_bytes": ("tandem_worker_kv_handoff_bytes_total", "KV handoff bytes received"),
            "kv_in_seconds": (
                "tandem_worker_kv_handoff_seconds_total",
                "KV handoff seconds (offer to done)",
            ),
            "migrations_out_started": (
                "tandem_worker_migrations_out_started_total",
                "Migrations started from this worker (source)",
            ),
            "migrations_out_committed": (
                "tandem_worker_migrations_out_committed_total",
                "Migrations from this worker that committed at the destination",
            ),
            "migrations_out_aborted": (
                "tandem_worker_migrations_out_aborted_total",
                "Migrations from this worker that aborted (the request stayed here)",
            ),
            "migration_blocks": (
                "tandem_worker_migration_blocks_total",
                "KV blocks sent by committed migrations",
            ),
            "migration_seconds": (
                "tandem_worker_migration_seconds_total",
                "Seconds of committed migrations (first stage to DONE)",
            ),
            "migration_downtime_seconds": (
                "tandem_worker_migration_downtime_seconds_total",
                "Seconds migrated requests were out of every batch",
            ),
            "migrations_in_committed": (
                "tandem_worker_migrations_in_committed_total",
                "Migrations received and resumed here (destination)",
            ),
            "migrations_in_aborted": (
                "tandem_worker_migrations_in_aborted_total",
                "Incoming migrations aborted here, their reservation freed",
            ),
            "migrations_in_expired": (
                "tandem_worker_migrations_in_expired_total",
                "Incoming migrations freed because their source went silent",
            ),
            "migration_reserved_blocks": (
                "tandem_worker_migration_reserved_blocks",
                "KV blocks held for incoming migrations in progress",
            ),
            "queued_prefill_tokens": (
                "tandem_worker_queued_prefill_tokens",
                "Prompt tokens waiting (prefill workers)",
            ),
            **PREFIX_CACHE_GAUGES,
        }
        for key, (name, help_text) in gauges.items():
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for worker, stats in sorted(workers.items()):
                if key in stats:
                    lines.append(f'{name}{{worker="{worker}"}} {stats[key]}')
        lines += prefix_cache_totals(workers)
        return "\n".join(lines) + "\n"


# Prefix caching (tandem/kvcache/prefix.py): per worker, from its stats.
PREFIX_CACHE_GAUGES = {
    "prefix_cache_queries": (
        "tandem_worker_prefix_cache_queries_total",
        "Requests admitted, each counted once (prefix-cache lookups)",
    ),
    "prefix_cache_hits": (
        "tandem_worker_prefix_cache_hits_total",
        "Admitted requests that found at least one cached block",
    ),
    "prefix_cache_query_tokens": (
        "tandem_worker_prefix_cache_query_tokens_total",
        "Prompt tokens of admitted requests",
    ),
    "prefix_cache_hit_tokens": (
        "tandem_worker_prefix_cache_hit_tokens_total",
        "Prompt tokens whose KV came from the prefix cache instead of being computed",
    ),
    "prefix_cache_host_hit_tokens": (
        "tandem_worker_prefix_cache_host_hit_tokens_total",
        "Of the hit tokens, those swapped in from the host tier's cache",
    ),
    "prefix_cache_resume_hit_tokens": (
        "tandem_worker_prefix_cache_resume_hit_tokens_total",
        "Tokens a request preempted by recompute got back from the cache on resuming",
    ),
    "prefix_cache_hit_rate": (
        "tandem_worker_prefix_cache_hit_rate",
        "Prompt-token hit rate of the prefix cache",
    ),
    "prefix_cache_request_hit_rate": (
        "tandem_worker_prefix_cache_request_hit_rate",
        "Fraction of admitted requests that hit the prefix cache",
    ),
    "kv_cached_blocks": (
        "tandem_worker_kv_cached_blocks",
        "Device KV blocks holding a cached (named) prefix block, in use or evictable",
    ),
    "kv_evictable_blocks": (
        "tandem_worker_kv_evictable_blocks",
        "Cached device KV blocks no request holds (counted as free)",
    ),
    "kv_cache_evictions": (
        "tandem_worker_kv_cache_evictions_total",
        "Cached device KV blocks evicted to make room",
    ),
    "host_kv_cached_blocks": (
        "tandem_worker_host_kv_cached_blocks",
        "Host-tier KV blocks holding a cached prefix block",
    ),
    "host_kv_cache_evictions": (
        "tandem_worker_host_kv_cache_evictions_total",
        "Cached host-tier KV blocks evicted to make room",
    ),
    "kv_in_skipped_blocks": (
        "tandem_worker_kv_received_skipped_blocks_total",
        "KV blocks a handoff or migration did not move: this worker had them cached",
    ),
    "host_cache_write_blocks": (
        "tandem_worker_prefix_cache_host_write_blocks_total",
        "Evicted cached device blocks written to the host tier's cache",
    ),
    "host_cache_load_blocks": (
        "tandem_worker_prefix_cache_host_load_blocks_total",
        "Cached blocks loaded from the host tier instead of being recomputed",
    ),
}


def prefix_cache_totals(workers: dict[str, dict]) -> list[str]:
    """The prefix-cache hit rates over every worker (tokens and requests)."""
    sums = {
        k: sum(int(s.get(k) or 0) for s in workers.values())
        for k in ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_query_tokens",
                  "prefix_cache_hit_tokens")
    }  # fmt: skip
    tokens = sums["prefix_cache_query_tokens"]
    queries = sums["prefix_cache_queries"]
    return [
        "# HELP tandem_prefix_cache_hit_rate Prompt-token hit rate of the prefix cache, all workers",
        "# TYPE tandem_prefix_cache_hit_rate gauge",
        f"tandem_prefix_cache_hit_rate {sums['prefix_cache_hit_tokens'] / tokens if tokens else 0.0}",
        "# HELP tandem_prefix_cache_request_hit_rate Fraction of requests that hit, all workers",
        "# TYPE tandem_prefix_cache_request_hit_rate gauge",
        f"tandem_prefix_cache_request_hit_rate {sums['prefix_cache_hits'] / queries if queries else 0.0}",
    ]
