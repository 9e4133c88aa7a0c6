"""Head-of-line blocking on the real engine (small model, CPU, batch size 4).

Four long requests (1,000 output tokens) are submitted before sixteen short ones (16
tokens). Under fcfs the short ones wait for the long ones; under mlfq they finish first,
and the long ones still finish. The JCT ratio itself is measured by
bench/hol_blocking.py, not asserted here.
"""

from __future__ import annotations

import pytest

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.request import SamplingParams


def finish_order(model_dir, policy: str) -> list[str]:
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(block_size=16, num_blocks=1024),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, policy=policy),
        )
    )
    for i in range(4):
        engine.add_request(
            [10 + i] * 8,
            SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True),
            f"long{i}",
        )
    for i in range(16):
        engine.add_request(
            [100 + i] * 8,
            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
            f"short{i}",
        )
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert engine.scheduler.device_kv.num_free_blocks == 1024
    return order


@pytest.mark.slow
def test_mlfq_finishes_short_requests_before_long_ones(tiny_llama_dir):
    fcfs = finish_order(tiny_llama_dir, "fcfs")
    mlfq = finish_order(tiny_llama_dir, "mlfq")
    assert sorted(fcfs) == sorted(mlfq) and len(mlfq) == 20, "a request did not finish"
    assert all(r.startswith("long") for r in fcfs[:4]), (
        f"fcfs should be blocked by the long ones: {fcfs}"
    )
    assert all(r.startswith("short") for r in mlfq[:16]), (
        f"mlfq should finish every short one first: {mlfq}"
    )
