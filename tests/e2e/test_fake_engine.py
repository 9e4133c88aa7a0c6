"""`tandem decode-worker --fake-engine` behind `tandem router`, as real processes.

The model-free engine must look like the real one to the control plane: 50 concurrent
streams each get exactly max_tokens tokens, and the worker reports no KV in use after.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.servers import free_port, stop

MAX_TOKENS = 24
STREAMS = 50


def _wait_ready(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """The worker's address from its ready line. ``proc.stdout`` must be unbuffered
    (``bufsize=0``): a buffered reader could hold the ready line after an earlier one, where
    ``select`` no longer sees it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline().decode()
            if line.startswith("TANDEM_WORKER_READY"):
                return line.split()[1]
        assert proc.poll() is None, "the fake-engine worker exited during start-up"
    pytest.fail("the fake-engine worker did not become ready")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def stack(tiny_llama_dir):
    env = {**os.environ, "TANDEM_LOG_LEVEL": "WARNING"}
    cli = [sys.executable, "-m", "tandem.cli"]
    worker = subprocess.Popen(
        [*cli, "decode-worker", "--fake-engine", "--fake-step-ms", "5", "--model",
         str(tiny_llama_dir), "--kv-blocks", "512", "--ready-fd", "1"],
        env=env, stdout=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    procs = [worker]
    try:
        addr = _wait_ready(worker)
        port = free_port()
        router = subprocess.Popen(
            [*cli, "router", "--model", str(tiny_llama_dir), "--worker", addr, "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(router)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if json.loads(_get(url + "/health"))["workers"] == 1:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert router.poll() is None, "the router exited during start-up"
            assert time.monotonic() < deadline, "the router did not become healthy"
            time.sleep(0.2)
        yield url, addr
    finally:
        stop(procs, timeout=10)


async def _one_stream(session, url: str, i: int) -> tuple[int, int, str | None, bool]:
    """(content events, usage completion_tokens, finish_reason, saw [DONE])."""
    body = {"prompt": [10 + i, 11, 12], "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events, usage, finish, done = 0, -1, None, False
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                events += 1
                finish = chunk["choices"][0]["finish_reason"] or finish
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    return events, usage, finish, done


async def _many(url: str) -> list[tuple[int, int, str | None, bool]]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(_one_stream(session, url, i) for i in range(STREAMS)))


def test_concurrent_streams_complete_and_free_kv(stack):
    url, addr = stack
    results = asyncio.run(asyncio.wait_for(_many(url), timeout=30))
    for events, usage, finish, done in results:
        # The fake emits only ids that decode on their own: one SSE event per token.
        assert (events, usage, finish, done) == (MAX_TOKENS, MAX_TOKENS, "length", True)
    pattern = re.compile(rf'tandem_worker_kv_blocks_used{{worker="{re.escape(addr)}"}} (\d+)')
    time.sleep(1.1)  # the worker reports stats once a second: let a report from after the run in
    deadline = time.monotonic() + 5
    while True:
        metrics = _get(url + "/metrics")
        m = pattern.search(metrics)
        if m and int(m.group(1)) == 0 and "tandem_worker_running_requests" in metrics:
            break
        assert time.monotonic() < deadline, f"KV still in use after all streams ended:\n{metrics}"
        time.sleep(0.2)
    assert f'tandem_requests_total{{outcome="length"}} {STREAMS}' in metrics
