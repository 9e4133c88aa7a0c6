"""Proactive KV offload on the real engine (tiny Llama, CPU).

A device tier far too small for the load (64 blocks of 4 tokens; the 16 requests need up
to 23 blocks each) and a large host tier. Requests arrive in four waves, each of a
higher priority class than the last, with a batch of 4: the earlier, lower-priority
requests sit idle on the device while the newer ones run, which is when offload to the
host pays. Every request must finish with exactly the greedy tokens of an unconstrained
run, no block may leak in either tier, and proactive swaps must really have happened.
"""

from __future__ import annotations

import random

import pytest

from tandem.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.request import SamplingParams

NEW_TOKENS = 32
WAVES = 4
PER_WAVE = 4
STEPS_BETWEEN_WAVES = 6


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    return [
        [rng.randrange(8, vocab) for _ in range(rng.randint(20, 60))]
        for _ in range(WAVES * PER_WAVE)
    ]


def _run(model_dir, prompts, *, kv_blocks: int, host_blocks: int, int8: bool = False):
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(
                block_size=4, num_blocks=kv_blocks, num_host_blocks=host_blocks, swap_int8=int8
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=PER_WAVE,
                max_num_batched_tokens=128,
                policy="fcfs",
                preemption_mode="swap" if host_blocks else "recompute",
            ),
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = []
    for wave in range(WAVES):
        for p in prompts[wave * PER_WAVE : (wave + 1) * PER_WAVE]:
            reqs.append(engine.add_request(p, params, priority=WAVES - wave))
        for _ in range(STEPS_BETWEEN_WAVES):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    sched = engine.scheduler
    assert all(r.is_finished and r.num_output_tokens == NEW_TOKENS for r in reqs)
    assert sched.device_kv.audit().ok and sched.device_kv.num_free_blocks == kv_blocks
    if host_blocks:
        assert sched.host_kv.audit().ok and sched.host_kv.num_free_blocks == host_blocks
    return engine, [r.output_token_ids for r in reqs]


@pytest.fixture(scope="module")
def prompts_and_reference(tiny_llama_dir):
    prompts = _prompts(ModelConfig.from_pretrained(tiny_llama_dir).vocab_size)
    _, ref = _run(tiny_llama_dir, prompts, kv_blocks=4096, host_blocks=0)
    return prompts, ref


def test_tiny_device_tier_offloads_and_matches_an_unconstrained_run(
    tiny_llama_dir, prompts_and_reference
):
    prompts, ref = prompts_and_reference
    engine, out = _run(tiny_llama_dir, prompts, kv_blocks=64, host_blocks=2048)
    swap = engine.scheduler.swap
    assert swap.proactive_outs > 0, "nothing was offloaded under the watermark"
    assert swap.out_blocks > 0 and swap.in_blocks > 0
    bpb = engine.runner.host_kv.bytes_per_block  # of out_bytes, prefix-cache write-backs apart
    assert swap.out_bytes - swap.cache_out_bytes == swap.out_blocks * bpb
    assert swap.cache_out_bytes == swap.cache_out_blocks * bpb
    assert swap.in_bytes - swap.cache_in_bytes == swap.in_blocks * bpb
    assert swap.in_wait_s > 0  # on CPU every swap-in is synchronous
    assert out == ref


def test_int8_swap_completes_without_leaks_and_mostly_agrees(tiny_llama_dir, prompts_and_reference):
    prompts, ref = prompts_and_reference
    engine, out = _run(tiny_llama_dir, prompts, kv_blocks=64, host_blocks=2048, int8=True)
    swap = engine.scheduler.swap
    assert swap.proactive_outs > 0 and swap.in_blocks > 0
    host = engine.runner.host_kv
    dense = 4 * 4 * 2 * 4 * engine.model_config.num_kv_heads * engine.model_config.head_dim
    assert host.data.dtype.is_floating_point is False and host.bytes_per_block < dense / 3
    same = sum(a == b for o, r in zip(out, ref, strict=True) for a, b in zip(o, r, strict=True))
    agreement = same / (len(ref) * NEW_TOKENS)
    assert agreement >= 0.9, f"greedy agreement with int8 swap only {agreement:.3f}"
