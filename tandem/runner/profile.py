"""Profile the cost model on the hardware the engine runs on (seconds, not minutes).

Runs a handful of real forward passes through ``ModelRunner.execute`` before any request
is served — prefills of a few lengths, decodes of a few batch sizes and contexts — and
fits ``CostModel`` to the timings. It writes only into KV blocks that no request owns yet
(the pool is empty at start-up) and samples nothing that leaves the runner.
"""

from __future__ import annotations

import statistics
import time

from tandem.request import Request, SamplingParams
from tandem.runner.model_runner import ModelRunner
from tandem.sched.cost_model import CostModel
from tandem.sched.output import ScheduledChunk, SchedulerOutput

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


def _chunk(rid: str, start: int, n: int, table: list[int]) -> ScheduledChunk:
    req = Request(rid, [1] * (start + n), _GREEDY, 0.0)
    return ScheduledChunk(req, [1] * n, start, table, sample=True)


def _time(runner: ModelRunner, sched: SchedulerOutput, repeats: int = 2) -> float:
    runner.execute(sched)  # warm-up (allocator, kernels)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute(sched)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def profile_cost_model(
    runner: ModelRunner, max_batched_tokens: int, max_num_seqs: int
) -> CostModel:
    bs = runner.block_size
    num_blocks = runner.kv.data.shape[2]
    cap_tokens = num_blocks * bs
    prefill = []
    for n in (16, 64, 256, 1024, 4096):
        if n > max_batched_tokens or n > cap_tokens:
            break
        table = list(range(-(-n // bs)))
        prefill.append((n, _time(runner, SchedulerOutput(chunks=[_chunk("p", 0, n, table)]))))
    if len(prefill) < 3:  # tiny budgets: fall back to whatever lengths fit
        prefill = [
            (
                n,
                _time(
                    runner, SchedulerOutput(chunks=[_chunk("p", 0, n, list(range(-(-n // bs))))])
                ),
            )
            for n in sorted(
                {
                    1,
                    max(2, min(max_batched_tokens, cap_tokens) // 2),
                    min(max_batched_tokens, cap_tokens),
                }
            )
        ]

    def decode_points(shapes):
        """(batch, total context, seconds) for each (batch, ctx) whose blocks fit."""
        points = []
        for batch, ctx in shapes:
            per_seq = -(-ctx // bs)
            if batch > max_num_seqs or batch * per_seq > num_blocks:
                continue
            chunks = [
                _chunk(f"d{i}", ctx - 1, 1, list(range(i * per_seq, (i + 1) * per_seq)))
                for i in range(batch)
            ]
            points.append((batch, batch * ctx, _time(runner, SchedulerOutput(chunks=chunks))))
        return points

    decode = decode_points((b, c) for b in (1, 4, 16, 64) for c in (64, 512))
    if len(decode) < 3:  # a small device tier: short contexts that fit (not collinear)
        decode = decode_points(((1, bs), (1, 2 * bs), (2, bs), (2, 2 * bs)))
    if len(decode) < 3:
        raise ValueError("KV cache too small to profile decode; pass a cost model file instead")
    return CostModel.fit(prefill, decode)
