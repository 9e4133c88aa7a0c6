"""Drive one run: send the jobs on their arrival schedule, bounded, and collect records.

Bounds: at most ``num_requests`` requests are sent (the jobs are reused in order when there
are fewer), none after ``duration_s`` seconds; requests already sent are always awaited, so
every request sent ends up in the records (errors included). With ``max_concurrency``, a
request due while that many are in flight waits for one to finish; its send time (TTFT and
JCT start) is when it is actually sent, as in vLLM's benchmark.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Sequence

import aiohttp

from loadgen.arrivals import send_offsets
from loadgen.client import RequestRecord, Target, send
from loadgen.dataset import Job
from loadgen.progress import Progress
from loadgen.tokens import PromptTokenizer


async def run_load(
    target: Target,
    jobs: Sequence[Job],
    *,
    rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    num_requests: int | None = None,
    duration_s: float | None = None,
    max_concurrency: int | None = None,
    use_timestamps: bool = False,
    tok: PromptTokenizer | None = None,
    progress: Progress | None = None,
) -> tuple[list[RequestRecord], float]:
    """Returns (records, duration): duration from the first send to the last end."""
    if num_requests is None and duration_s is None:
        raise ValueError("a run needs --num-requests or --duration")
    if num_requests is None and math.isinf(rate) and not max_concurrency and not use_timestamps:
        raise ValueError("--duration with --request-rate inf needs --max-concurrency")
    stamps = [j.timestamp or 0.0 for j in jobs] if use_timestamps else None
    offsets = send_offsets(rate, burstiness, seed, stamps)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    tasks: list[asyncio.Task[RequestRecord]] = []

    async def one(job: Job) -> RequestRecord:
        rec = None
        try:
            rec = await send(session, target, job, start, tok)
            return rec
        finally:
            if limit is not None:
                limit.release()
            if progress is not None:
                progress.on_done(rec is not None and rec.ok)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.5)
            if progress is not None:
                progress.tick()

    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        tick = asyncio.create_task(ticker())
        start = time.perf_counter()
        try:
            for k, offset in zip(itertools.count(), offsets):
                if num_requests is not None and k >= num_requests:
                    break
                if duration_s is not None and offset > duration_s:
                    break
                delay = start + offset - time.perf_counter()
                await asyncio.sleep(max(delay, 0.0))  # also lets started requests run
                if limit is not None:
                    await limit.acquire()
                if duration_s is not None and time.perf_counter() - start > duration_s:
                    if limit is not None:
                        limit.release()
                    break
                job = jobs[k % len(jobs)]
                if k >= len(jobs):  # a reused job keeps a unique index in the records
                    job = Job(k, job.prompt, job.prompt_len, job.output_len, None, job.priority)
                tasks.append(asyncio.create_task(one(job)))
                if progress is not None:
                    progress.on_sent()
            records = list(await asyncio.gather(*tasks))
            duration = time.perf_counter() - start
        finally:
            tick.cancel()
            for t in tasks:
                t.cancel()
        return records, duration
