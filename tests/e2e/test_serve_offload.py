"""`tandem serve` with a device KV tier far too small for a burst, and a large host tier.

32 requests arrive at once; each needs about 11 blocks of 4 tokens and the device holds
48, so requests must be swapped to the host tier and back. Every request must succeed
with its full length, and /metrics must show the swaps.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.sched.cost_model import CostModel
from tests.e2e.servers import serve

N_REQUESTS = 32
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    # mlfq with a fixed cost model: the device tier is too small to profile one.
    cost = tmp_path_factory.mktemp("offload") / "cost.json"
    CostModel().save(cost)
    with serve(tiny_llama_dir, "--block-size", "4", "--kv-blocks", "48", "--host-kv-blocks", "4096",
               "--max-num-seqs", "8", "--served-model-name", "tiny", "--cost-model", str(cost),
               timeout=120) as url:  # fmt: skip
        yield url


def _complete(url: str, i: int) -> dict:
    body = {
        "model": "tiny",
        "prompt": f"Request number {i}: tell me a story about swapping",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        return json.loads(r.read())


def _metric(text: str, name: str) -> float:
    values = [float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)]
    assert values, f"{name} missing from /metrics"
    return sum(values)


def test_burst_swaps_to_host_and_every_request_succeeds(server):
    with ThreadPoolExecutor(N_REQUESTS) as pool:
        results = list(pool.map(lambda i: _complete(server, i), range(N_REQUESTS)))
    for res in results:
        assert res["usage"]["completion_tokens"] == MAX_TOKENS
        assert res["choices"][0]["finish_reason"] == "length"
    # Worker stats reach the router once a second (the burst may end within one period):
    # wait for a report from after the burst, idle with swaps counted, then check it.
    deadline = time.time() + 15
    while True:
        with urllib.request.urlopen(server + "/metrics", timeout=5) as r:
            text = r.read().decode()
        idle = _metric(text, "tandem_worker_kv_blocks_used") == 0
        if (idle and _metric(text, "tandem_worker_swapped_out_blocks_total") > 0) or (
            time.time() > deadline
        ):
            break
        time.sleep(0.5)
    assert _metric(text, "tandem_worker_swapped_out_blocks_total") > 0
    assert _metric(text, "tandem_worker_swapped_in_blocks_total") > 0
    assert _metric(text, "tandem_worker_swapped_out_bytes_total") > 0
    assert _metric(text, "tandem_worker_swapped_in_bytes_total") > 0
    assert _metric(text, "tandem_worker_swap_in_wait_seconds_total") > 0
    assert "# TYPE tandem_worker_proactive_swap_outs_total counter" in text
    assert _metric(text, "tandem_worker_kv_blocks_used") == 0, "blocks leaked after the burst"
    assert _metric(text, "tandem_worker_swapped_requests") == 0
