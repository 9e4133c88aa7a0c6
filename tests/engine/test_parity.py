"""The engine's greedy output equals transformers' greedy output, token for token.

For each architecture: 16 prompts of 1..500 tokens, 64 new tokens each, all submitted
together (continuous batching) with a token budget of 64 (multi-chunk prefills), in
float32 on CPU. Then the same with a block pool so small that requests are preempted
and resumed several times, by recompute and by swapping to a host tier.
"""

from __future__ import annotations

import pytest
import torch

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.request import SamplingParams
from tests.engine.parity import compare, mixed_prompts, reference_greedy

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    """Per arch: (prompts, [Reference]) from transformers, each prompt run alone."""
    from transformers import AutoModelForCausalLM

    refs = {}
    for arch in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dirs[arch], dtype=torch.float32
        ).eval()
        prompts = mixed_prompts(model.config.vocab_size, n=16, seed=1)
        refs[arch] = (prompts, [reference_greedy(model, p, NEW_TOKENS) for p in prompts])
    return refs


def run_engine(model_dir, prompts, *, num_blocks=2048, host_blocks=0, budget=64, max_seqs=256):
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(block_size=16, num_blocks=num_blocks, num_host_blocks=host_blocks),
            scheduler=SchedulerConfig(
                max_num_seqs=max_seqs,
                max_num_batched_tokens=budget,
                preemption_mode="swap" if host_blocks else "recompute",
            ),
        )
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    multi_chunk = False
    while engine.has_unfinished_requests():
        out = engine.scheduler.schedule()
        multi_chunk |= any(not c.sample for c in out.chunks)
        runner_out = engine.runner.execute(out)
        engine.outputs.process(engine.scheduler.update_from_output(out, runner_out))
    assert engine.scheduler.device_kv.audit().ok
    assert engine.scheduler.device_kv.num_free_blocks == num_blocks, "device blocks leaked"
    if host_blocks:
        assert engine.scheduler.host_kv.audit().ok
        assert engine.scheduler.host_kv.num_free_blocks == host_blocks, "host blocks leaked"
    return engine, reqs, multi_chunk


def assert_parity(refs, reqs):
    failures = []
    for i, (ref, req) in enumerate(zip(refs, reqs, strict=True)):
        ok, why = compare(ref, req.output_token_ids)
        if not ok:
            failures.append(f"prompt {i} (len {req.num_prompt_tokens}): {why}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity_continuous_batching(arch, tiny_model_dirs, references):
    prompts, refs = references[arch]
    engine, reqs, multi_chunk = run_engine(tiny_model_dirs[arch], prompts)
    assert multi_chunk, "the token budget did not force any multi-chunk prefill"
    # Decodes of several requests shared iterations with prefill chunks of others.
    assert engine.num_iterations < sum(len(p) for p in prompts) // 64 + NEW_TOKENS * len(prompts)
    assert_parity(refs, reqs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_greedy_parity_under_preemption(arch, mode, tiny_model_dirs, references):
    prompts, refs = references[arch]
    # The longest request needs (500 + 64) / 16 = 36 blocks; 48 forces heavy preemption.
    host = 4096 if mode == "swap" else 0
    engine, reqs, _ = run_engine(tiny_model_dirs[arch], prompts, num_blocks=48, host_blocks=host)
    preempted_more_than_once = [r for r in reqs if r.num_preemptions >= 2]
    assert preempted_more_than_once, "no request was preempted and resumed several times"
    if mode == "swap":
        assert (
            engine.scheduler.num_swapped_out_blocks > 0
            and engine.scheduler.num_swapped_in_blocks > 0
        )
    assert_parity(refs, reqs)
