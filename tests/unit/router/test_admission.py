"""The router's admission MLFQ with fake workers (pure asyncio)."""

from __future__ import annotations

import asyncio

from router.admission import AdmissionQueue
from tandem.sched.cost_model import CostModel

COST = CostModel(
    prefill_base=0.0,
    prefill_per_token=1e-3,
    prefill_per_token_sq=0.0,
    decode_base=0.01,
    decode_per_seq=0.0,
    decode_per_ctx_token=0.0,
)


class FakeWorker:
    def __init__(self, slots: int) -> None:
        self.connected = True
        self.hello = {"max_num_seqs": slots, "kv_blocks": 100}
        self.in_flight = 0
        self.stats: dict = {}


def test_short_prompts_and_better_classes_are_admitted_first_when_full():
    async def main():
        w = FakeWorker(slots=1)
        q = AdmissionQueue(lambda: [w], cost_model=COST)
        first, granted = await q.admit(10)
        assert first is w and not granted
        w.in_flight = 1  # the slot is taken
        order = []

        async def wait(name, n_tokens, prio=0):
            worker, g = await q.admit(n_tokens, prio)
            order.append(name)
            w.in_flight += 1
            q.submitted(worker, g)

        tasks = [
            asyncio.create_task(wait("long-a", 4000)),
            asyncio.create_task(wait("long-b", 4000)),
            asyncio.create_task(wait("short", 8)),
            asyncio.create_task(wait("vip-long", 4000, prio=-1)),
        ]
        await asyncio.sleep(0.01)
        assert order == [] and len(q) == 4
        assert q.lengths()[q.mlfq.join_level(8)] == 1
        for _ in range(4):  # one request finishes at a time
            w.in_flight -= 1
            q.wake()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert order == ["vip-long", "short", "long-a", "long-b"]
        assert len(q) == 0

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue():
    async def main():
        w = FakeWorker(slots=1)
        w.in_flight = 1
        q = AdmissionQueue(lambda: [w], cost_model=COST)
        t = asyncio.create_task(q.admit(10))
        await asyncio.sleep(0.01)
        t.cancel()
        await asyncio.sleep(0.01)
        w.in_flight = 0
        q.wake()
        assert len(q) == 0
        worker, granted = await q.admit(10)  # the slot was not lost
        assert worker is w

    asyncio.run(main())


def test_dispatch_prefers_the_lowest_virtual_usage():
    async def main():
        busy, idle = FakeWorker(slots=8), FakeWorker(slots=8)
        busy.stats = {"kv_used": 90}
        idle.stats = {"kv_used": 10}
        q = AdmissionQueue(lambda: [busy, idle], cost_model=COST)
        worker, _ = await q.admit(10)
        assert worker is idle
        idle.in_flight = 8  # full: the other one, however loaded, gets it
        worker, _ = await q.admit(10)
        assert worker is busy

    asyncio.run(main())
