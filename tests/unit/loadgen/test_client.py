"""loadgen.client against a real local HTTP server that misbehaves in the ways servers do.

Every failure becomes a recorded error with a message; nothing raises, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from loadgen.client import Target, send
from loadgen.dataset import Job
from loadgen.runner import run_load


async def _sse(request, chunks, done=True, delay=0.0):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for c in chunks:
        await asyncio.sleep(delay)
        await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
    if done:
        await resp.write(b"data: [DONE]\n\n")
    return resp


def _text(t):
    return {"choices": [{"index": 0, "text": t}]}


async def ok(request):
    body = await request.json()
    assert body["stream"] and body["max_tokens"] == 3 and body["priority"] == 2
    return await _sse(request, [_text("a"), _text(""), _text("b"), _text("c"),
                                {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}],
                      delay=0.01)  # fmt: skip


async def chat(request):
    body = await request.json()
    assert body["messages"][0]["content"] == "p" and body["max_completion_tokens"] == 3
    return await _sse(request, [{"choices": [{"delta": {"role": "assistant"}}]},
                                {"choices": [{"delta": {"content": "xy"}}]}])  # fmt: skip


async def refused(request):
    return web.json_response({"error": {"message": "prompt too long", "code": 400}}, status=400)


async def error_event(request):
    return await _sse(request, [_text("a"), {"error": {"message": "worker lost"}}])


async def truncated(request):
    return await _sse(request, [_text("a")], done=False)


async def slow(request):
    await asyncio.sleep(5)
    return web.Response()


IN_FLIGHT = {"now": 0, "max": 0}


async def counted(request):
    IN_FLIGHT["now"] += 1
    IN_FLIGHT["max"] = max(IN_FLIGHT["max"], IN_FLIGHT["now"])
    try:
        return await _sse(request, [_text("a"), _text("b")], delay=0.02)
    finally:
        IN_FLIGHT["now"] -= 1


pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def base_url(unused_tcp_port):
    app = web.Application()
    for name, handler in [("ok", ok), ("refused", refused), ("error", error_event),
                          ("truncated", truncated), ("slow", slow), ("counted", counted)]:  # fmt: skip
        app.router.add_post(f"/{name}/v1/completions", handler)
    app.router.add_post("/chat/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    yield f"http://127.0.0.1:{unused_tcp_port}"
    await runner.cleanup()


JOB = Job(0, "p", 1, 3, priority=2)


async def _send(url, endpoint="completions", timeout=30.0):
    async with aiohttp.ClientSession() as s:
        return await send(s, Target(url, "m", endpoint, timeout_s=timeout), JOB, 0.0, None)


async def test_stream_is_timed_and_counted_from_usage(base_url):
    r = await _send(base_url + "/ok")
    assert r.ok and r.text == "abc" and r.output_len == 3 and r.prompt_len == 9
    assert len(r.itl) == 2 and all(g > 0 for g in r.itl)  # the empty chunk is not a token gap
    assert 0 < r.ttft < r.latency and r.tpot == pytest.approx((r.latency - r.ttft) / 2)


async def test_chat_deltas(base_url):
    r = await _send(base_url + "/chat", "chat")
    assert r.ok and r.text == "xy"
    assert r.output_len == 1  # no usage and no tokenizer: one text chunk counts as one token


@pytest.mark.parametrize(
    "path, message",
    [("/refused", "HTTP 400: prompt too long"), ("/error", "stream error: worker lost"),
     ("/truncated", "stream ended without [DONE]"), ("/nowhere", "HTTP 404")],
)  # fmt: skip
async def test_failures_are_recorded_errors(base_url, path, message):
    r = await _send(base_url + path)
    assert not r.ok and r.error.startswith(message)


async def test_timeout_and_connection_refused(base_url, unused_tcp_port_factory):
    r = await _send(base_url + "/slow", timeout=0.2)
    assert r.error == "timeout after 0.2 s"
    r = await _send(f"http://127.0.0.1:{unused_tcp_port_factory()}")
    assert not r.ok and "Connect" in r.error


JOBS = [Job(i, "p", 1, 2) for i in range(5)]


async def test_run_is_bounded_by_count_and_concurrency(base_url):
    IN_FLIGHT["max"] = 0
    target = Target(base_url + "/counted", "m")
    records, duration = await run_load(target, JOBS, num_requests=12, max_concurrency=3)
    assert len(records) == 12 and all(r.ok for r in records)
    assert sorted(r.index for r in records) == list(range(12))  # reused jobs, unique indices
    assert IN_FLIGHT["max"] == 3
    assert duration >= max(r.start + r.latency for r in records) - 1e-6


async def test_run_is_bounded_by_duration(base_url):
    target = Target(base_url + "/counted", "m")
    records, duration = await run_load(target, JOBS, rate=20.0, duration_s=0.5, seed=1)
    assert 3 <= len(records) <= 25 and all(r.start <= 0.5 + 0.25 for r in records)


async def test_interrupt_records_every_request_in_flight(base_url):
    target = Target(base_url + "/slow", "m", timeout_s=30)
    asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGINT)
    records, duration = await run_load(target, JOBS, num_requests=50, rate=20.0)
    assert duration < 3.0 and 2 <= len(records) < 50
    assert all(r.error == "cancelled: run interrupted" for r in records)
