"""Greedy parity with transformers when requests share cached prefixes.

For each architecture: prompts built from two "system prompts" (100 tokens: not block
aligned; 64 tokens: block aligned) cut at many lengths, with exact duplicates, prompts
that are exact prefixes of others, a fully cached block-aligned prompt, and a chat turn
that resends the previous turn. A first wave warms the cache; the second wave arrives
together (hits on cached blocks and on blocks computed by its own members) and a third
arrives while the second is decoding. Each engine output must equal transformers' greedy
output for that prompt run alone, with a roomy cache, and with a cache so small that
requests are preempted by recompute or by swapping to a host tier (which then also
keeps evicted cached blocks and serves them back: the hierarchical cache); each with
synchronous stepping and with async scheduling (blocks are named only over tokens whose
ids are known).
"""

from __future__ import annotations

import random

import pytest
import torch

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.request import SamplingParams
from tests.engine.parity import compare, reference_greedy

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 24
BS = 16


def _prompts(vocab: int, turn1_answer: list[int]) -> list[list[list[int]]]:
    """Three waves of prompts; ``turn1_answer``: the greedy answer to wave 1's chat turn."""
    rng = random.Random(11)

    def toks(n: int) -> list[int]:
        return [rng.randrange(8, vocab) for _ in range(n)]

    s1, s2 = toks(100), toks(64)
    turn1 = s2 + toks(10)
    wave1 = [s1 + toks(7), s2 + toks(5), turn1]
    wave2 = [
        s1 + toks(20),
        s1[:50] + toks(9),
        s1[:32],  # a block-aligned exact prefix of cached blocks: recomputes its last block
        list(s1),  # unaligned, fully inside the cached chain
        list(s2),  # aligned, every block cached
        list(wave1[0]),  # an identical prompt
        s2 + toks(16),  # aligned total
        s2[:16] + toks(3),
        turn1 + turn1_answer + toks(5),  # the next chat turn resends the history
        toks(40),  # shares nothing
    ]
    wave3 = [s1 + toks(2), list(s2[:48]), s1[:99] + toks(1)]
    return [wave1, wave2, wave3]


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    refs = {}
    for arch in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dirs[arch], dtype=torch.float32
        ).eval()
        vocab = model.config.vocab_size
        turn1 = _prompts(vocab, [])[0][2]
        waves = _prompts(vocab, reference_greedy(model, turn1, NEW_TOKENS).tokens)
        refs[arch] = (waves, [[reference_greedy(model, p, NEW_TOKENS) for p in w] for w in waves])
    return refs


def _run(model_dir, waves, *, num_blocks: int, host_blocks: int = 0, overlap: bool = False):
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(block_size=BS, num_blocks=num_blocks, num_host_blocks=host_blocks),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=64,
                preemption_mode="swap" if host_blocks else "recompute",
                policy="fcfs",
            ),
            async_scheduling=overlap,
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = []
    wave1 = [engine.add_request(p, params) for p in waves[0]]
    while engine.has_unfinished_requests():
        engine.step()
    wave2 = [engine.add_request(p, params) for p in waves[1]]
    for _ in range(6):
        engine.step()
    wave3 = [engine.add_request(p, params) for p in waves[2]]
    while engine.has_unfinished_requests():
        engine.step()
    out = [wave1, wave2, wave3]
    kv = engine.scheduler.device_kv
    assert kv.audit().ok and kv.pool.num_used == 0 and kv.num_free_blocks == num_blocks
    if host_blocks:
        host = engine.scheduler.host_kv
        assert host.audit().ok and host.pool.num_used == 0
    return engine, out


def _assert_parity(refs, reqs) -> None:
    failures = []
    for w, (wave_refs, wave_reqs) in enumerate(zip(refs, reqs, strict=True)):
        for i, (ref, req) in enumerate(zip(wave_refs, wave_reqs, strict=True)):
            ok, why = compare(ref, req.output_token_ids)
            if not ok:
                failures.append(
                    f"wave {w} prompt {i} (len {req.num_prompt_tokens}, "
                    f"cached {req.num_cached_tokens}): {why}"
                )
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_parity_with_shared_prefixes(arch, overlap, tiny_model_dirs, references):
    waves, refs = references[arch]
    engine, reqs = _run(tiny_model_dirs[arch], waves, num_blocks=2048, overlap=overlap)
    stats = engine.scheduler.prefix_stats
    wave2 = reqs[1]
    # Hits of every kind really happened: unaligned, aligned, duplicate, chat turn.
    # The chat turn: 74 prompt + 23 computed answer tokens = 6 full blocks of turn 1.
    assert [r.num_cached_tokens for r in wave2[:9]] == [96, 48, 16, 96, 48, 96, 64, 16, 96]
    assert wave2[9].num_cached_tokens == 0
    assert stats.hits >= 12 and stats.hit_tokens > stats.query_tokens // 2
    _assert_parity(refs, reqs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_parity_with_shared_prefixes_under_preemption(
    arch, mode, overlap, tiny_model_dirs, references
):
    waves, refs = references[arch]
    # The longest request needs (129 + 24) / 16 = 10 blocks; 24 forces many preemptions.
    host = 2048 if mode == "swap" else 0
    engine, reqs = _run(
        tiny_model_dirs[arch], waves, num_blocks=24, host_blocks=host, overlap=overlap
    )
    sched = engine.scheduler
    assert sched.num_preemptions >= 3, "the small cache did not force preemptions"
    assert sched.prefix_stats.hit_tokens > 0 and sched.device_kv.num_evictions > 0
    if mode == "swap":
        assert sched.num_swapped_out_blocks > 0 and sched.num_swapped_in_blocks > 0
        # The host tier is a second cache level: evicted prefixes came back from it.
        assert sched.swap.cache_out_blocks > 0 and sched.prefix_stats.host_hit_tokens > 0
    _assert_parity(refs, reqs)
