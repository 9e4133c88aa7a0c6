"""Router + two workers found through a real Redis; one worker is killed mid-run.

Every in-flight request of the dead worker is continued on the survivor (or ends with an
explicit error event): none hangs, every completed stream has exactly the greedy text,
new requests go to the survivor, and the dead worker leaves the registry within its TTL.
The workers are colocated (prefill + decode in one process): the disaggregated pools
plug into the same registry and router.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from tandem import LLM, SamplingParams
from tests.e2e.servers import free_port, health, spawn_cli, stop

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)

TTL = 2.0
N_REQUESTS = 200
MAX_TOKENS = 120


@pytest.fixture
def redis_url():
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


async def _stream(session, url, i):
    body = {
        "prompt": f"request number {i}",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text, error = "", None
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                return text, error
            chunk = json.loads(payload)
            if "error" in chunk:
                error = chunk["error"]["message"]
            else:
                text += chunk["choices"][0]["text"]
    raise AssertionError(f"stream {i} ended without [DONE]")


async def _until_running(session, url, redis_url, worker_id, at_least=4, timeout=120.0):
    """Wait until the router reports ``worker_id`` decoding ``at_least`` requests, so the
    kill lands mid-run on any machine speed (a fixed sleep hit nothing on a slow CI box)."""
    import redis

    info = json.loads(redis.Redis.from_url(redis_url).get(f"tandem:worker:{worker_id}"))
    label = f'tandem_worker_running_requests{{worker="{info["address"]}"}}'
    deadline = time.time() + timeout
    while time.time() < deadline:
        async with session.get(url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(label) and float(line.split()[1]) >= at_least:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{worker_id} never had {at_least} running requests")


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_failover_through_redis_registry(mode, redis_url, tiny_llama_dir):
    """colocated: 2 workers. disaggregated: 2 prefill + 2 decode workers (KV over tcp);
    the killed one is a decode worker ("w0")."""
    import aiohttp
    import redis

    common = ["--model", str(tiny_llama_dir), "--registry", redis_url, "--max-num-batched-tokens", "512",
              "--registry-ttl", str(TTL)]  # fmt: skip
    if mode == "colocated":
        workers = [
            spawn_cli(["decode-worker", "--colocated", *common, "--worker-id", f"w{i}"])
            for i in range(2)
        ]
        others = []
    else:
        workers = [spawn_cli(["decode-worker", *common, "--worker-id", f"w{i}"]) for i in range(2)]
        others = [spawn_cli(["prefill-worker", *common, "--worker-id", f"p{i}"]) for i in range(2)]
    http_port = free_port()
    router = spawn_cli(
        [
            "router",
            "--model",
            str(tiny_llama_dir),
            "--registry",
            redis_url,
            "--port",
            str(http_port),
        ]
    )
    url = f"http://127.0.0.1:{http_port}"
    procs = [*workers, *others, router]
    survivors = sorted(["tandem:worker:w1"] + [f"tandem:worker:p{i}" for i in range(len(others))])
    try:
        deadline = time.time() + 180
        while health(url).get("workers") != len(workers) + len(others):
            assert time.time() < deadline, "router did not see both workers"
            assert all(p.poll() is None for p in procs), "a process exited during start-up"
            time.sleep(0.3)

        async def run():
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                tasks = [asyncio.create_task(_stream(session, url, i)) for i in range(N_REQUESTS)]
                await _until_running(session, url, redis_url, "w0")
                workers[0].send_signal(signal.SIGKILL)  # mid-run
                results = await asyncio.gather(*tasks)
                after = await asyncio.gather(*(_stream(session, url, 1000 + i) for i in range(5)))
                return results, after

        results, after = asyncio.run(run())
        assert workers[0].poll() is not None, "the worker was not killed"

        offline = LLM(model=tiny_llama_dir, max_num_batched_tokens=512)
        prompts = [f"request number {i}" for i in range(N_REQUESTS)] + [
            f"request number {1000 + i}" for i in range(5)
        ]
        expected = [
            o.text
            for o in offline.generate(
                prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
            )
        ]
        errors = [e for _, e in results if e is not None]
        for (text, error), want in zip(results, expected, strict=False):
            if error is None:
                assert text == want, "a re-run stream skipped or repeated text"
        assert len(errors) == 0, (
            f"requests ended in errors although a survivor was up: {errors[:3]}"
        )
        for (text, error), want in zip(after, expected[N_REQUESTS:], strict=True):
            assert error is None and text == want, "a new request failed after the kill"

        keys_deadline = time.time() + TTL + 3
        r = redis.Redis.from_url(redis_url)
        while time.time() < keys_deadline:
            keys = sorted(k.decode() for k in r.keys("tandem:worker:*"))
            if keys == survivors:
                break
            time.sleep(0.2)
        assert keys == survivors, f"dead worker still registered: {keys}"
        with urllib.request.urlopen(url + "/metrics", timeout=5) as m:
            metrics = m.read().decode()
        reruns = float(
            next(
                line
                for line in metrics.splitlines()
                if line.startswith("tandem_router_reruns_total")
            ).split()[1]
        )
        assert reruns > 0, "the kill did not hit any request in flight"
        if mode == "disaggregated":
            handoffs = sum(
                float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith("tandem_worker_kv_handoffs_total")
            )
            assert handoffs > 0, "no request went through a prefill -> decode KV handoff"
    finally:
        stop(procs)
