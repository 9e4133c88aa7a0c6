"""Drive one run: send the jobs on their arrival schedule, bounded, and collect records.

Bounds: at most ``num_requests`` requests are sent (the jobs are reused in order when there
are fewer), none after ``duration_s`` seconds; requests already sent are always awaited, so
every request sent ends up in the records (errors included). Ctrl-C (SIGINT) stops the run
early: nothing more is sent, requests in flight are cancelled and recorded as errors
("cancelled: run interrupted"), and the caller still gets every record. With ``max_concurrency``, a
request due while that many are in flight waits for one to finish; its send time (TTFT and
JCT start) is when it is actually sent, as in vLLM's benchmark.

A chat turn (``Job.after``) is sent once the previous turn of its conversation ended, its
prompt that turn's prompt + the answer it got + its own new text (the static prompt, with a
synthetic answer, if that turn failed); its send time is when it actually goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import signal
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
    sent: list[Job] = []
    by_index: dict[int, asyncio.Task[RequestRecord]] = {}
    prompts: dict[int, str] = {}  # the prompt each job was really sent with

    async def one(job: Job) -> RequestRecord:
        rec = None
        try:
            job = await _with_history(job, by_index, prompts, tok)
            prompts[job.index] = job.prompt
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

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
        loop.add_signal_handler(signal.SIGINT, stop.set)

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
                await asyncio.sleep(0)  # lets started requests run
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
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
                by_index[job.index] = tasks[-1]
                sent.append(job)
                if progress is not None:
                    progress.on_sent()
            if tasks:
                all_done = asyncio.gather(*tasks, return_exceptions=True)
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait([all_done, stopper], return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                for t in tasks:
                    t.cancel()  # interrupted: each ends as a recorded error
                await asyncio.wait([all_done])
            records = [_record(job, t) for job, t in zip(sent, tasks, strict=True)]
            duration = time.perf_counter() - start
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)
            tick.cancel()
            for t in tasks:
                t.cancel()
        return records, duration


async def _with_history(
    job: Job,
    by_index: dict[int, asyncio.Task[RequestRecord]],
    prompts: dict[int, str],
    tok: PromptTokenizer | None,
) -> Job:
    """A chat turn's prompt, built from the previous turn once it ended (see module doc)."""
    prev = by_index.get(job.after) if job.after is not None else None
    if prev is None:
        return job
    await asyncio.wait([prev])
    if prev.cancelled() or prev.exception() is not None or not prev.result().ok:
        return job
    prompt = prompts[job.after] + prev.result().text + job.turn
    n = tok.count(prompt) if tok is not None else job.prompt_len
    return Job(job.index, prompt, n, job.output_len, job.timestamp, job.priority, job.after)


def _record(job: Job, task: asyncio.Task[RequestRecord]) -> RequestRecord:
    """The task's record; a task cancelled before it ran still yields an error record."""
    if not task.cancelled() and task.exception() is None:
        return task.result()
    why = (
        "cancelled: run interrupted" if task.cancelled() else f"client error: {task.exception()!r}"
    )
    return RequestRecord(job.index, job.priority, job.prompt_len, job.output_len, error=why)
