"""`tandem serve` with prefix caching on (the default) and off, as real processes: a
prompt sent twice is answered identically, and the second time its cached blocks are
reused (visible in the router's /metrics); with ``--no-prefix-caching`` nothing is."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.e2e.servers import metrics, serve

PROMPT = [(37 * i) % 1500 + 10 for i in range(100)]  # 6 full blocks of 16 + 4 tokens


def _generate(url: str, ids: list[int]) -> list[int]:
    body = {"prompt_token_ids": ids, "sampling_params": {"max_tokens": 8, "temperature": 0}}
    req = urllib.request.Request(
        url + "/generate", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    got = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: {"):
                got += json.loads(line[6:])["token_ids"]
    return got


def _cached_tokens(url: str, ids: list[int]) -> int:
    """usage.prompt_tokens_details.cached_tokens of a /v1/completions request."""
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["usage"]["prompt_tokens_details"]["cached_tokens"]


def _total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(name + "{"))


def _wait_for(url: str, name: str, at_least: float, timeout: float = 20.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if _total(m, name) >= at_least or time.time() > deadline:
            return m
        time.sleep(0.3)


@pytest.mark.parametrize("caching", [True, False])
def test_a_repeated_prompt_reuses_its_cached_blocks(tiny_llama_dir, caching):
    flags = [] if caching else ["--no-prefix-caching"]
    with serve(tiny_llama_dir, *flags, "--policy", "fcfs", timeout=120) as url:
        first = _generate(url, PROMPT)
        second = _generate(url, PROMPT)
        third = _generate(url, PROMPT[:70] + [5, 6, 7])
        assert first == second and len(first) == 8 and len(third) == 8
        m = _wait_for(url, "tandem_worker_prefix_cache_queries_total", 3)
        assert _total(m, "tandem_worker_prefix_cache_queries_total") == 3
        if caching:
            # 96 cached tokens for the repeat, 64 for the shared 70-token prefix.
            assert _total(m, "tandem_worker_prefix_cache_hit_tokens_total") == 96 + 64
            assert _total(m, "tandem_worker_prefix_cache_hits_total") == 2
            assert _total(m, "tandem_worker_kv_cached_blocks") >= 6
            assert m["tandem_prefix_cache_hit_rate"] == pytest.approx(160 / 273)
            # The OpenAI usage field reports the hit too: 6 full cached blocks.
            assert _cached_tokens(url, PROMPT) == 96
        else:
            assert _total(m, "tandem_worker_prefix_cache_hit_tokens_total") == 0
            assert _total(m, "tandem_worker_kv_cached_blocks") == 0
            assert m["tandem_prefix_cache_hit_rate"] == 0.0
            assert _cached_tokens(url, PROMPT) == 0
