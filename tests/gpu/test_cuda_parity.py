"""The engine on CUDA: greedy parity with transformers in float32, bf16 logits close.

The same 16 mixed-length prompts and continuous batching with multi-chunk prefills as the
CPU parity test, run with ``device="cuda"``; transformers runs on the same GPU.
"""

from __future__ import annotations

import pytest
import torch

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.request import SamplingParams
from tests.engine.parity import compare, mixed_prompts, reference_greedy

NEW_TOKENS = 32


def _engine(model_dir, dtype, num_blocks=2048, host_blocks=0, overlap=False):
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            device="cuda",
            dtype=dtype,
            cache=CacheConfig(block_size=16, num_blocks=num_blocks, num_host_blocks=host_blocks),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=64,
                preemption_mode="swap" if host_blocks else "recompute",
            ),
            async_scheduling=overlap,
        )
    )


def _run(engine, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished_requests():
        engine.step()
    return reqs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("host_blocks", [0, 256])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_greedy_parity_float32_on_cuda(arch, host_blocks, overlap, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32)
    model = model.to("cuda").eval()
    prompts = mixed_prompts(model.config.vocab_size, n=16, seed=1)
    refs = [reference_greedy(model, p, NEW_TOKENS, device="cuda") for p in prompts]
    # host_blocks: a device tier too small for the batch forces swaps through pinned memory
    engine = _engine(
        tiny_model_dirs[arch], "float32", 64 if host_blocks else 2048, host_blocks, overlap
    )
    reqs = _run(engine, prompts)
    failures = [why for ref, req in zip(refs, reqs, strict=True)
                for ok, why in [compare(ref, req.output_token_ids)] if not ok]  # fmt: skip
    assert not failures, failures
    assert engine.scheduler.device_kv.audit().ok


def test_bf16_logits_within_2e_2_of_transformers(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dirs["llama"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
    prompts = mixed_prompts(model.config.vocab_size, n=4, seed=2, max_len=200)
    engine = _engine(model_dir, "bfloat16")
    captured = []  # the logits of the last prompt position: eager path or (1 token) graph
    model_, graphs = engine.runner.model, engine.runner.graphs
    compute, replay = model_.compute_logits, graphs.run
    model_.compute_logits = lambda hidden: captured.append(compute(hidden)) or captured[-1]
    graphs.run = lambda s, src: captured.append(replay(s, src)) or captured[-1]
    for p in prompts:
        with torch.no_grad():
            want = model(torch.tensor([p], device="cuda")).logits[0, -1].float()
        captured.clear()
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        got = captured[-1][0].float()
        rel = float((got - want).norm() / want.norm())
        assert rel < 2e-2, f"relative logit error {rel:.3e} for a prompt of {len(p)} tokens"
