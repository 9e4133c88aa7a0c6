"""Live migration between two decode workers, as real processes on loopback.

`tandem serve --prefill-workers 1 --decode-workers 2 --migration manual`, driven by real
HTTP clients (aiohttp streams of /v1/completions):

- a request migrated in the middle of its output streams exactly the tokens of the same
  request run without migration, every token once and in order;
- a fault injected at each stage, on either side, aborts the migration: the request
  finishes correctly on its source, and no KV block stays used on any worker;
- draining a worker with 50 running requests moves them all: every one finishes with its
  full token count (a sample compared with unmigrated runs), the drained worker ends
  with no used block.

Fault injection is the test-only ``TANDEM_MIGRATION_FAULTS=1`` (``tandem.env``).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from tests.e2e.servers import metrics, serve

MAX_TOKENS = 160


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with serve(
        tiny_llama_dir,
        *("--prefill-workers", "1", "--decode-workers", "2", "--policy", "fcfs"),
        *("--migration", "manual", "--migration-lease", "5", "--served-model-name", "tiny"),
        timeout=240,
        workers=3,
        env={"TANDEM_MIGRATION_FAULTS": "1"},
    ) as url:
        yield url


def _body(prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}  # fmt: skip


class Stream:
    """One streamed completion: its id, the tokens of each SSE chunk, its usage."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.tokens: list[str] = []
        self.text = ""
        self.usage: dict | None = None
        self.finish: str | None = None
        self.errors: list = []

    async def run(self, session: aiohttp.ClientSession, url: str, body: dict) -> Stream:
        async with session.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    self.errors.append(chunk["error"])
                    continue
                self.id = chunk["id"]
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk["choices"]:
                    self.text += choice["text"]
                    self.finish = choice["finish_reason"] or self.finish
                    if choice["logprobs"]:
                        self.tokens += choice["logprobs"]["tokens"]
        return self


async def _wait(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _admin(session, url: str, method: str, path: str, body=None) -> tuple[int, dict]:
    async with session.request(method, url + path, json=body) as r:
        return r.status, await r.json()


async def _reference(url: str, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[Stream]:
    """The same requests with no migration (one at a time: nothing to move them)."""
    async with aiohttp.ClientSession() as s:
        return [await Stream().run(s, url, _body(p, max_tokens)) for p in prompts]


async def _migrate_mid_stream(url: str, prompt: str, body: dict) -> tuple[Stream, dict]:
    """Stream ``prompt``; once 20 tokens are out, POST /admin/migrate with ``body``."""
    async with aiohttp.ClientSession() as s:
        stream = Stream()
        task = asyncio.create_task(stream.run(s, url, _body(prompt)))
        await _wait(lambda: len(stream.tokens) >= 20 or task.done(), what="20 tokens")
        assert not task.done(), "the request finished before it could be migrated"
        status, result = await _admin(
            s, url, "POST", "/admin/migrate", {"request_id": stream.id, **body}
        )
        assert status == 200, result
        await task
        return stream, result


def _wait_no_blocks_used(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until every worker reports 0 used KV blocks (stats come each second)."""
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        used = {k: v for k, v in m.items() if k.startswith("tandem_worker_kv_blocks_used")}
        reserved = [v for k, v in m.items() if k.startswith("tandem_worker_migration_reserved")]
        if len(used) == 3 and not any(used.values()) and not any(reserved):
            return m
        if time.time() > deadline:
            raise AssertionError(f"KV blocks still used: {used}, reserved {reserved}")
        time.sleep(0.2)


def _assert_same(got: Stream, want: Stream) -> None:
    assert not got.errors, got.errors
    assert got.tokens == want.tokens, "tokens skipped, repeated or different"
    assert got.text == want.text
    assert got.usage["completion_tokens"] == MAX_TOKENS == len(got.tokens)
    assert got.finish == "length"


@pytest.mark.parametrize("min_copy_stages", [0, 3])
def test_migrated_stream_equals_the_unmigrated_one(server, min_copy_stages):
    prompt = f"migrate me after a few tokens ({min_copy_stages})"
    (want,) = asyncio.run(_reference(server, [prompt]))
    got, result = asyncio.run(
        _migrate_mid_stream(server, prompt, {"min_copy_stages": min_copy_stages})
    )
    assert result["outcome"] == "committed", result
    assert result["from"] != result["to"]
    assert result["stages"] >= min_copy_stages + 1 and result["blocks"] >= 1
    _assert_same(got, want)
    m = _wait_no_blocks_used(server)
    assert m['tandem_router_migrations_total{outcome="committed"}'] >= 1


FAULTS = ["source:first", "source:middle", "source:final",
          "dest:first", "dest:middle", "dest:final", "dest:commit"]  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS)
def test_an_abort_at_any_stage_leaves_the_request_on_its_source(server, fault):
    prompt = f"abort the migration at {fault}"
    (want,) = asyncio.run(_reference(server, [prompt]))
    before = metrics(server)
    got, result = asyncio.run(
        _migrate_mid_stream(server, prompt, {"min_copy_stages": 2, "fault": fault})
    )
    assert result["outcome"] == "aborted" and "injected fault" in result["error"], result
    _assert_same(got, want)
    after = _wait_no_blocks_used(server)
    key = 'tandem_router_migrations_total{outcome="aborted"}'
    assert after[key] == before.get(key, 0) + 1


def test_admin_bad_input_gets_a_clear_4xx(server):
    async def main():
        async with aiohttp.ClientSession() as s:
            stream = Stream()
            task = asyncio.create_task(stream.run(s, server, _body("bad admin input", 400)))
            await _wait(lambda: len(stream.tokens) >= 3, what="3 tokens")
            _, listing = await _admin(s, server, "GET", "/admin/workers")
            src = next(w for w in listing["workers"] if stream.id in w["requests"])["address"]
            cases = [
                ({"request_id": "cmpl-nope"}, 404, "request_id"),
                ({"request_id": stream.id, "to": "10.9.9.9:1"}, 404, "worker"),
                ({"request_id": stream.id, "to": src}, 400, None),
                ({"request_id": stream.id, "fault": "sideways:first"}, 400, "fault"),
                ({"request_id": stream.id, "fault": "source:commit"}, 400, "fault"),
                ({"request_id": stream.id, "min_copy_stages": 99}, 400, "min_copy_stages"),
                ({"request_id": 7}, 400, "request_id"),
                ([1, 2], 400, None),
            ]
            for body, status, param in cases:
                got, payload = await _admin(s, server, "POST", "/admin/migrate", body)
                assert got == status, (body, payload)
                assert payload["error"]["message"]
                if param is not None:
                    assert payload["error"]["param"] == param, payload
            for method in ("POST", "GET", "DELETE"):
                got, payload = await _admin(s, server, method, "/admin/drain/no-such-worker")
                assert got == 404 and "unknown worker" in payload["error"]["message"]
            async with s.post(server + "/admin/migrate", data=b"{nope") as r:
                assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
            task.cancel()

    asyncio.run(main())
    _wait_no_blocks_used(server)


def test_drain_moves_50_running_requests_off_a_worker(server):
    """Scale-down: 50 requests run on one decode worker (the other is drained first, so
    dispatch skips it), then that worker is drained onto the other."""
    n, sample = 50, 5
    prompts = [f"drain request {i} of {n}" for i in range(n)]
    want = asyncio.run(_reference(server, prompts[:sample], 120))

    async def main():
        async with aiohttp.ClientSession() as s:
            _, listing = await _admin(s, server, "GET", "/admin/workers")
            target, spare = (w["address"] for w in listing["workers"])
            status, _ = await _admin(s, server, "POST", f"/admin/drain/{spare}")
            assert status == 202
            streams = [Stream() for _ in prompts]
            tasks = [
                asyncio.create_task(st.run(s, server, _body(p, 120)))
                for st, p in zip(streams, prompts, strict=True)
            ]
            await _wait(lambda: all(len(st.tokens) >= 2 for st in streams), what="decoding")
            _, listing = await _admin(s, server, "GET", "/admin/workers")
            on_it = {w["address"]: len(w["requests"]) for w in listing["workers"]}[target]
            assert on_it == n, listing
            await _admin(s, server, "DELETE", f"/admin/drain/{spare}")
            status, started = await _admin(s, server, "POST", f"/admin/drain/{target}")
            assert status == 202 and started["draining"], started
            await asyncio.gather(*tasks)
            status, state = await _admin(s, server, "GET", f"/admin/drain/{target}")
            assert status == 200 and state["remaining"] == 0
            await _admin(s, server, "DELETE", f"/admin/drain/{target}")
            return streams, state, on_it, target

    streams, state, on_it, drained = asyncio.run(main())
    for st in streams:
        assert not st.errors and st.finish == "length", st.errors
        assert st.usage["completion_tokens"] == 120 == len(st.tokens)
    for got, ref in zip(streams[:sample], want, strict=True):
        assert got.tokens == ref.tokens
    # Every request on it moved (none was near its end when the drain began).
    assert state["done"] and state["migrated"] == on_it and state["failed"] == 0, state
    m = _wait_no_blocks_used(server)
    assert m[f'tandem_worker_migrations_out_committed_total{{worker="{drained}"}}'] >= 1
    assert m[f'tandem_worker_kv_blocks_used{{worker="{drained}"}}'] == 0


def test_a_burst_is_spread_over_the_decode_workers(server):
    """Dispatch sees the requests it just placed: 20 at once split about evenly (it once
    sent 49 of 50 to one worker, every choice reading the same in-flight counts)."""

    async def main():
        async with aiohttp.ClientSession() as s:
            streams = [Stream() for _ in range(20)]
            tasks = [
                asyncio.create_task(st.run(s, server, _body(f"burst {i}", 60)))
                for i, st in enumerate(streams)
            ]
            await _wait(lambda: all(len(st.tokens) >= 1 for st in streams), what="decoding")
            _, listing = await _admin(s, server, "GET", "/admin/workers")
            await asyncio.gather(*tasks)
            return sorted(len(w["requests"]) for w in listing["workers"])

    counts = asyncio.run(main())
    assert len(counts) == 2 and counts[0] >= 7, counts


def test_metrics_name_every_migration_figure(server):
    with urllib.request.urlopen(server + "/metrics", timeout=5) as r:
        text = r.read().decode()
    for name in ("tandem_router_migrations_total", "tandem_migration_seconds_bucket",
                 "tandem_migration_downtime_seconds_bucket", "tandem_migration_blocks_bucket",
                 "tandem_worker_migrations_out_started_total",
                 "tandem_worker_migration_downtime_seconds_total",
                 "tandem_worker_migrations_in_committed_total"):  # fmt: skip
        assert name in text, name
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(server + "/admin/drain/x", method="POST"))
    assert e.value.code == 404
