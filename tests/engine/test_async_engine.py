"""Async scheduling through the real engine on CPU (the tiny models, float32).

With ``async_scheduling`` the engine launches iteration N+1 before it reads N's sampled
ids; the runner takes N's tokens for N+1 on the device (placeholders). On CPU nothing runs
concurrently, but every line of that path runs: these tests check that it changes no
token. Greedy output equals transformers' (continuous batching, recompute and swap
preemption), and for each feature whose rule depends on tokens (EOS and stop ids, stop
strings, min_tokens, seeds, penalties, logprobs, aborts, export/import and migration
between steps) the overlapped engine returns exactly what the synchronous one returns.
"""

from __future__ import annotations

import pytest
import torch

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm import LLM
from tandem.engine.llm_engine import LLMEngine
from tandem.request import SamplingParams
from tests.engine.parity import compare, mixed_prompts, reference_greedy

NEW_TOKENS = 24


def _engine(model_dir, overlap, num_blocks=2048, host_blocks=0, budget=64, tokenizer=None):
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(block_size=16, num_blocks=num_blocks, num_host_blocks=host_blocks),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=budget,
                preemption_mode="swap" if host_blocks else "recompute",
                policy="fcfs",
            ),
            async_scheduling=overlap,
        ),
        tokenizer=tokenizer,
    )


def _drain(engine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert engine.scheduler.device_kv.audit().ok
    assert engine.scheduler.device_kv.num_free_blocks == engine.config.cache.num_blocks
    return outs


@pytest.fixture(scope="module")
def llama_refs(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32)
    prompts = mixed_prompts(model.config.vocab_size, n=8, seed=3, max_len=300)
    return prompts, [reference_greedy(model.eval(), p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("mode", ["batching", "recompute", "swap"])
def test_greedy_parity_with_overlap(mode, tiny_model_dirs, llama_refs):
    prompts, refs = llama_refs
    # The longest request needs (300 + 24) / 16 = 21 blocks; 28 forces preemption.
    blocks = {"batching": 2048, "recompute": 28, "swap": 28}[mode]
    engine = _engine(tiny_model_dirs["llama"], True, blocks, 4096 if mode == "swap" else 0)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    _drain(engine)
    if mode != "batching":
        assert any(r.num_preemptions >= 2 for r in reqs), "no request was preempted twice"
    if mode == "swap":
        assert engine.scheduler.num_swapped_in_blocks > 0
    failures = [why for ref, req in zip(refs, reqs, strict=True)
                for ok, why in [compare(ref, req.output_token_ids)] if not ok]  # fmt: skip
    assert not failures, failures


def _llm(model_dir, overlap):
    return LLM(model_dir, max_num_batched_tokens=64, policy="fcfs", async_scheduling=overlap)


def _summary(outputs):
    return [(o.token_ids, o.text, o.finish_reason, o.stop_reason, o.logprobs) for o in outputs]


def test_every_token_rule_gives_the_synchronous_result(tiny_llama_dir):
    sync, overlap = _llm(tiny_llama_dir, False), _llm(tiny_llama_dir, True)
    assert overlap.engine.async_scheduling and not sync.engine.async_scheduling
    prompts = mixed_prompts(2048, n=8, seed=11, max_len=120)
    first = sync.generate(prompts[0], SamplingParams(temperature=0.0, max_tokens=24))[0]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40),  # may stop on EOS
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[first.token_ids[5]]),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[first.text[8:11] or "e"]),
        SamplingParams(temperature=0.0, max_tokens=20, min_tokens=12, ignore_eos=False),
        SamplingParams(temperature=0.9, top_p=0.8, seed=7, max_tokens=25, ignore_eos=True),
        SamplingParams(
            temperature=0.0,
            max_tokens=20,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            ignore_eos=True,
        ),  # fmt: skip
        SamplingParams(temperature=0.7, seed=3, logprobs=3, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
    ]
    want = _summary(sync.generate(prompts, params))
    got = _summary(overlap.generate(prompts, params))
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        assert a == b, f"request {i} ({params[i]}) differs with overlap"


def test_abort_between_steps_frees_everything(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, True)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in mixed_prompts(2048, n=6, seed=5, max_len=100)]
    for _ in range(6):
        engine.step()
    aborted = engine.abort_request(reqs[2].request_id)
    assert aborted is not None and aborted.finished and aborted.finish_reason == "abort"
    outs = _drain(engine)
    assert all(o.request_id != reqs[2].request_id for o in outs), "tokens after the abort"
    assert [len(r.output_token_ids) for i, r in enumerate(reqs) if i != 2] == [20] * 5


@pytest.mark.parametrize("steps", [3, 11])
def test_export_between_overlapped_steps_moves_the_pending_token(tiny_llama_dir, steps):
    prompts = mixed_prompts(2048, n=4, seed=9, max_len=150)
    params = SamplingParams(temperature=0.8, seed=21, max_tokens=30, ignore_eos=True)
    base = _engine(tiny_llama_dir, False)
    base_reqs = [base.add_request(p, params) for p in prompts]
    _drain(base)
    src, dst = _engine(tiny_llama_dir, True), _engine(tiny_llama_dir, True)
    reqs = [src.add_request(p, params) for p in prompts]
    for _ in range(steps):
        src.step()
    moved = [r for r in reqs if r.status.value == "running" and r.num_output_tokens]
    assert moved and any(r.num_pending_tokens for r in moved), "nothing in flight to move"
    for r in moved:
        exported = src.export_request(r.request_id)
        assert exported.request.num_pending_tokens == 0
        dst.import_request(exported)
    _drain(src)
    _drain(dst)
    for b, r in zip(base_reqs, reqs, strict=True):
        assert r.output_token_ids == b.output_token_ids, f"{r.request_id} continued differently"


def test_async_scheduling_defaults_and_the_cli_flag(tiny_llama_dir):
    """On by default for CUDA only; ``--no-async-scheduling`` is a worker flag that reaches
    the engine config (``tandem serve`` passes it on to the workers it starts)."""
    from tandem import cli
    from tandem.engine.llm import build_engine_config

    assert not build_engine_config(model=tiny_llama_dir, kv_blocks=16).async_scheduling
    on = build_engine_config(model=tiny_llama_dir, kv_blocks=16, async_scheduling=True)
    assert on.async_scheduling
    parser = cli.build_parser()
    for flags, want in (([], None), (["--no-async-scheduling"], False)):
        args = parser.parse_args(["decode-worker", "--model", str(tiny_llama_dir), *flags])
        assert args.no_async_scheduling is (want is False)
        config = cli._engine_config(args, parser)
        assert config.async_scheduling is False  # CPU: off either way
