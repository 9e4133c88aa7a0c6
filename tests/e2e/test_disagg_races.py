"""Races of the disaggregated path, with the services in one process (real engines, real
tcp KV transfer, the real router app), so a fault can be injected at the exact point.

- The router's ``expect`` reaches the decode worker *after* the KV commit (two sockets):
  the buffered tokens, finish included, must still reach the client.
- A handoff whose DONE is lost (``maybe_committed``): the request must not be decoded twice
  (no duplicated tokens); it is re-run cleanly or fails with an explicit error.
- A request that finishes on its first token leaves no state on either worker.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from decode_worker.disagg import DecodeWorkerService
from kvtransfer import TransferError, make_receiver, make_sender
from prefill_worker.service import PrefillWorkerService
from router.app import RouterConfig, build_app
from tandem import LLM, SamplingParams
from tandem.engine.llm import build_engine_config
from tandem.engine.llm_engine import LLMEngine


async def _stack(model_dir, timeout=20.0):
    pe = LLMEngine(build_engine_config(str(model_dir), policy="fcfs", kv_blocks=256))
    prefill = PrefillWorkerService(pe, kv_sender=make_sender("tcp", pe.compat_hash, timeout_s=5.0))
    await prefill.start()
    de = LLMEngine(build_engine_config(str(model_dir), policy="fcfs", kv_blocks=256))
    decode = DecodeWorkerService(
        de,
        kv_receiver_factory=lambda cb: make_receiver(
            "tcp", de.compat_hash, cb, host="127.0.0.1", port=0, lease_s=5.0
        ),
    )
    await decode.start()
    config = RouterConfig(
        model_dir=str(model_dir),
        served_model_name="tiny",
        workers=(f"127.0.0.1:{prefill.port}", f"127.0.0.1:{decode.port}"),
        request_timeout=timeout,
    )
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    return prefill, decode, runner, url


async def _teardown(prefill, decode, runner):
    await runner.cleanup()
    await prefill.shutdown()
    await decode.shutdown()


async def _complete(url, body):
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json()


@pytest.fixture(scope="module")
def expected(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir)
    return lambda n: (
        llm.generate("hello there", SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[
            0
        ].text
    )


@pytest.mark.parametrize("max_tokens", [3, 40])
def test_expect_arriving_after_the_kv_commit(tiny_llama_dir, expected, max_tokens):
    async def main():
        prefill, decode, runner, url = await _stack(tiny_llama_dir)
        try:
            original = decode.on_message

            def late(conn, msg):  # the router socket is read after the KV socket committed
                asyncio.get_running_loop().call_later(0.3, original, conn, msg)

            decode.on_message = late
            status, body = await asyncio.wait_for(
                _complete(
                    url,
                    {
                        "prompt": "hello there",
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                ),
                15,
            )
            assert status == 200, body
            assert body["choices"][0]["text"] == expected(max_tokens)
            assert body["usage"]["completion_tokens"] == max_tokens
            await asyncio.sleep(0.5)
            assert not decode._buffered and not decode._expected
            assert prefill.handoffs_ok == 1
        finally:
            await _teardown(prefill, decode, runner)

    asyncio.run(main())


def test_lost_done_never_duplicates_tokens(tiny_llama_dir, expected):
    async def main():
        prefill, decode, runner, url = await _stack(tiny_llama_dir)
        try:
            real_send = prefill.kv_sender.send
            calls = []

            async def lossy_send(dest, bundle, *args, **kwargs):
                await real_send(dest, bundle, *args, **kwargs)
                calls.append(bundle.request_id)
                if len(calls) == 1:  # the first DONE is "lost" after the decode worker committed
                    raise TransferError(
                        bundle.request_id, "DONE lost (injected)", maybe_committed=True
                    )

            prefill.kv_sender.send = lossy_send
            status, body = await asyncio.wait_for(
                _complete(
                    url,
                    {
                        "prompt": "hello there",
                        "max_tokens": 20,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                ),
                20,
            )
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 20, "tokens were duplicated or lost"
            assert body["choices"][0]["text"] == expected(20)
            assert len(calls) == 2 and calls[1].endswith("~1"), (
                "the re-run did not get a fresh wire id"
            )
            await asyncio.sleep(0.5)
            assert (
                decode.engine.scheduler.num_unfinished == 0
                and prefill.engine.scheduler.num_unfinished == 0
            )
            assert (
                decode.engine.scheduler.device_kv.audit().ok
                and decode.engine.scheduler.device_kv.pool.num_used == 0
            )
        finally:
            await _teardown(prefill, decode, runner)

    asyncio.run(main())


def test_request_finishing_on_its_first_token_leaves_no_state(tiny_llama_dir):
    async def main():
        prefill, decode, runner, url = await _stack(tiny_llama_dir)
        try:
            for _ in range(3):
                status, _ = await _complete(url, {"prompt": "hi", "max_tokens": 1})
                assert status == 200
            await asyncio.sleep(0.5)
            assert not prefill._dest and not decode._expected and prefill.handoffs_ok == 0
        finally:
            await _teardown(prefill, decode, runner)

    asyncio.run(main())


def test_first_token_arriving_after_the_decode_tokens(tiny_llama_dir, expected):
    """The prefill worker's first-token frame is delayed, so the decode worker's tokens
    reach the router first: the client must still get them in order."""

    async def main():
        prefill, decode, runner, url = await _stack(tiny_llama_dir)
        try:
            original = prefill._send
            loop = asyncio.get_running_loop()

            def slow_socket(conn, msg):  # the whole prefill -> router path lags by 0.5 s
                loop.call_soon_threadsafe(loop.call_later, 0.5, original, conn, msg)

            prefill._send = slow_socket
            status, body = await asyncio.wait_for(
                _complete(
                    url,
                    {
                        "prompt": "hello there",
                        "max_tokens": 12,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                ),
                15,
            )
            assert status == 200, body
            assert body["choices"][0]["text"] == expected(12)
        finally:
            await _teardown(prefill, decode, runner)

    asyncio.run(main())
