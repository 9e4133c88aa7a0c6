"""Cache-aware dispatch with real processes: `tandem serve --prefill-workers 1
--decode-workers 2` (the default ``--dispatch prefix``). A conversation whose every turn
resends the history goes back to the decode worker that holds it (its handoffs then move
only the new blocks), while unrelated requests that arrive meanwhile still reach the
other worker; all of it visible in the router's /metrics."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from tests.e2e.servers import metrics, serve
from tests.e2e.test_prefix_cache_serve import _generate, _total, _wait_for

_rng = random.Random(21)
TURN1 = [_rng.randrange(10, 1500) for _ in range(100)]


def _per_worker(m: dict[str, float], name: str) -> dict[str, float]:
    return {k.split("{", 1)[1]: v for k, v in m.items() if k.startswith(name + "{")}


async def _agenerate(session, url: str, ids: list[int], max_tokens: int) -> list[int]:
    body = {"prompt_token_ids": ids, "sampling_params": {"max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}}  # fmt: skip
    got: list[int] = []
    async with session.post(url + "/generate", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: {"):
                got += json.loads(line[6:])["token_ids"]
    return got


def test_a_conversation_returns_to_its_worker_without_starving_the_other(tiny_llama_dir):
    flags = ("--prefill-workers", "1", "--decode-workers", "2", "--policy", "fcfs")
    with serve(tiny_llama_dir, *flags, timeout=240, workers=3) as url:
        answer1 = _generate(url, TURN1)
        m = _wait_for(url, "tandem_worker_kv_received_total", 1)
        received = _per_worker(m, "tandem_worker_kv_received_total")
        (home,) = [w for w, n in received.items() if n == 1]
        (other,) = [w for w in received if w != home]
        turn2 = TURN1 + answer1 + [_rng.randrange(10, 1500) for _ in range(10)]

        async def busy_period():
            async with aiohttp.ClientSession() as s:
                # Two long requests that share the conversation's first 96 tokens: they
                # follow it home (plain usage dispatch would put one on each worker).
                siblings = []
                for i in range(2):
                    tail = [1500 + i] * 8
                    siblings.append(asyncio.create_task(_agenerate(s, url, TURN1[:96] + tail, 120)))
                    await asyncio.sleep(0.2)
                convo = asyncio.create_task(_agenerate(s, url, turn2, 40))
                await asyncio.sleep(0.3)  # home is now the busier worker
                fresh = [
                    _agenerate(s, url, [_rng.randrange(10, 1500) for _ in range(100)], 40)
                    for _ in range(4)
                ]
                await asyncio.gather(*siblings)
                return await convo, await asyncio.gather(*fresh)

        answer2, _ = asyncio.run(busy_period())
        turn3 = turn2 + answer2 + [7, 7, 7, 7, 7]
        _generate(url, turn3)
        m = _wait_for(url, "tandem_worker_kv_received_total", 9)
        received = _per_worker(m, "tandem_worker_kv_received_total")
        skipped = _per_worker(m, "tandem_worker_kv_received_skipped_blocks_total")
        assert sum(received.values()) == 9
        # The siblings and both later turns went home: each skipped the blocks held there
        # (6 for each sibling and turn 2, 9 for turn 3) ...
        assert skipped[home] >= 6 + 6 + 6 + 9, skipped
        assert skipped[other] == 0
        # ... and the other worker was not starved: the fresh requests went there.
        assert received[other] >= 2, received
        assert m["tandem_router_prefix_dispatches_total"] >= 4
        assert _total(metrics(url), "tandem_worker_kv_cached_blocks") > 0
