"""Prefix caching on CUDA: the CPU prefix-parity workload (shared prefixes aligned and
not, duplicates, a chat turn; three waves) with the Triton backend and CUDA graphs, roomy
and with a device tier so small that the hierarchical cache writes evicted blocks to
pinned host memory and loads them back on the side stream (cache_out / cache_in)."""

from __future__ import annotations

import pytest
import torch

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.request import SamplingParams
from tests.engine.parity import reference_greedy
from tests.engine.test_prefix_parity import NEW_TOKENS, _assert_parity, _prompts


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("host_blocks", [0, 2048])
def test_prefix_cache_parity_on_cuda(arch, host_blocks, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    model = model.to("cuda").eval()
    vocab = model.config.vocab_size
    turn1 = _prompts(vocab, [])[0][2]
    waves = _prompts(vocab, reference_greedy(model, turn1, NEW_TOKENS, device="cuda").tokens)
    refs = [[reference_greedy(model, p, NEW_TOKENS, device="cuda") for p in w] for w in waves]
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dirs[arch]),
            device="cuda",
            dtype="float32",
            cache=CacheConfig(
                block_size=16, num_blocks=24 if host_blocks else 2048, num_host_blocks=host_blocks
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=64,
                policy="fcfs",
                preemption_mode="swap" if host_blocks else "recompute",
            ),
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [[engine.add_request(p, params) for p in waves[0]]]
    while engine.has_unfinished_requests():
        engine.step()
    reqs.append([engine.add_request(p, params) for p in waves[1]])
    for _ in range(6):
        engine.step()
    reqs.append([engine.add_request(p, params) for p in waves[2]])
    while engine.has_unfinished_requests():
        engine.step()
    sched = engine.scheduler
    assert sched.prefix_stats.hit_tokens > 0
    if host_blocks:
        assert sched.swap.cache_out_blocks > 0 and sched.prefix_stats.host_hit_tokens > 0
    kv = sched.device_kv
    assert kv.audit().ok and kv.pool.num_used == 0
    _assert_parity(refs, reqs)
