"""Live migration with the services in one process (real engines, real tcp KV transfer,
the real router app), where a test can reach inside:

- the rebalancer (``--migration balanced``) moves long requests off the decode worker a
  skewed dispatch overloaded, and every moved request still produces its greedy tokens;
- a destination frees the reservation of a migration whose source went silent between
  stages, and refuses the source's late stage.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import torch
from aiohttp import web

from decode_worker.disagg import DecodeWorkerService
from kvtransfer import KVBundle, TransferRefused, make_receiver, make_sender
from prefill_worker.service import PrefillWorkerService
from router.app import ROUTER_KEY, RouterConfig, build_app
from router.migration import MigrationConfig
from tandem import LLM, SamplingParams
from tandem.engine.llm import build_engine_config
from tandem.engine.llm_engine import LLMEngine
from tandem.migration import TransferId

LONG, SHORT = 200, 6


def _engine(model_dir, kv_blocks=64):
    return LLMEngine(build_engine_config(str(model_dir), policy="fcfs", kv_blocks=kv_blocks))


async def _decode(model_dir, lease_s=5.0):
    e = _engine(model_dir)
    service = DecodeWorkerService(
        e,
        kv_receiver_factory=lambda cb: make_receiver(
            "tcp", e.compat_hash, cb, host="127.0.0.1", port=0, lease_s=5.0
        ),
        kv_sender=make_sender("tcp", e.compat_hash, timeout_s=5.0),
        migration_lease_s=lease_s,
    )
    await service.start()
    return service


async def _poll(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def long_text(tiny_llama_dir):
    params = SamplingParams(temperature=0.0, max_tokens=LONG, ignore_eos=True)
    return LLM(model=tiny_llama_dir, policy="fcfs").generate("a long story", params)[0].text


def test_rebalancer_moves_requests_off_the_overloaded_worker(tiny_llama_dir, long_text):
    async def main():
        pe = _engine(tiny_llama_dir, kv_blocks=256)
        prefill = PrefillWorkerService(pe, kv_sender=make_sender("tcp", pe.compat_hash))
        await prefill.start()
        decodes = [await _decode(tiny_llama_dir) for _ in range(2)]
        config = RouterConfig(
            model_dir=str(tiny_llama_dir),
            served_model_name="tiny",
            workers=(f"127.0.0.1:{prefill.port}", *(f"127.0.0.1:{d.port}" for d in decodes)),
            request_timeout=120,
            dispatch="round-robin",  # long and short requests alternate: the long ones pile up
            migration=MigrationConfig(mode="balanced", interval_s=0.2, min_gap=0.1),
        )
        app = build_app(config)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        router = app[ROUTER_KEY]
        try:
            async with aiohttp.ClientSession() as s:

                async def complete(prompt, n, started):
                    body = {"prompt": prompt, "max_tokens": n, "temperature": 0,
                            "ignore_eos": True, "stream": True}  # fmt: skip
                    text = ""
                    async with s.post(url + "/v1/completions", json=body) as r:
                        assert r.status == 200
                        async for line in r.content:
                            if line.startswith(b"data: {"):
                                started.set()
                                text += __import__("json").loads(line[6:])["choices"][0]["text"]
                    return text

                tasks = []
                for i in range(8):  # one at a time, so round-robin alternates for sure
                    started = asyncio.Event()
                    long = i % 2 == 0
                    prompt = "a long story" if long else f"short {i}"
                    tasks.append(
                        asyncio.create_task(complete(prompt, LONG if long else SHORT, started))
                    )
                    await asyncio.wait_for(started.wait(), 30)
                texts = await asyncio.gather(*tasks)
            assert [t for t in texts[::2]] == [long_text] * 4
            committed = router.metrics.migrations["committed"]
            assert committed >= 1, dict(router.metrics.migrations)
            # Both workers decoded long requests in the end, and nothing is left behind.
            assert all(
                d.migration_out.stats.started + d.migration_in.inbox.committed for d in decodes
            )
            await _poll(lambda: all(d.engine.scheduler.device_kv.pool.num_used == 0 for d in decodes),
                        what="free blocks")  # fmt: skip
            assert all(d.engine.scheduler.device_kv.audit().ok for d in decodes)
        finally:
            await runner.cleanup()
            await prefill.shutdown()
            for d in decodes:
                await d.shutdown()

    asyncio.run(main())


def test_a_silent_source_loses_its_reservation(tiny_llama_dir):
    async def main():
        dest = await _decode(tiny_llama_dir, lease_s=0.5)
        sender = make_sender("tcp", dest.engine.compat_hash, timeout_s=5.0)
        try:
            mc = dest.engine.model_config
            payload = torch.zeros(mc.num_layers, 2, 3, 16, mc.num_kv_heads, mc.head_dim)
            stage0 = str(TransferId("ghost", 1, 0, False))
            await sender.send(dest.kv_address, KVBundle(stage0, 48, payload, {"migration": {}}))
            kv = dest.engine.scheduler.device_kv
            assert kv.pending_import_blocks("ghost") == 3 and kv.pool.num_used == 3
            # The source never sends stage 1: the destination frees the blocks on its own.
            await _poll(lambda: kv.pool.num_used == 0, timeout=30, what="the lease to lapse")
            assert dest.migration_in.inbox.expired == 1 and kv.audit().ok
            late = str(TransferId("ghost", 1, 1, True))
            with pytest.raises(TransferRefused, match="not open here"):
                await sender.send(dest.kv_address, KVBundle(late, 16, payload[:, :, :1], {}))
            assert kv.pool.num_used == 0
        finally:
            await sender.close()
            await dest.shutdown()

    asyncio.run(main())
