"""Export a running request's KV blocks from one engine, import them into another.

The continuation on the second engine must be identical to an uninterrupted run: this
is the primitive that KV handoff, host offload and migration are built on.
"""

from __future__ import annotations

import pytest

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import KVCompatibilityError, LLMEngine
from tandem.request import SamplingParams
from tests.engine.parity import mixed_prompts


def make_engine(model_dir, block_size=16, num_blocks=512):
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=96),
        )
    )


def drain(engine):
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("export_after_steps", [2, 9, 20])
def test_export_import_continues_identically(arch, export_after_steps, tiny_model_dirs):
    model_dir = tiny_model_dirs[arch]
    prompts = mixed_prompts(2048, n=4, seed=7, max_len=200)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=40, ignore_eos=True)
    params = [greedy, seeded, greedy, seeded]

    baseline = make_engine(model_dir)
    base_reqs = [baseline.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    drain(baseline)

    src = make_engine(model_dir)
    dst = make_engine(model_dir)
    reqs = [src.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for _ in range(export_after_steps):
        src.step()
    moved = [r for r in reqs if r.status.value == "running"]
    assert moved, "nothing running to export"
    for r in moved:
        exported = src.export_request(r.request_id)
        assert exported.payload.shape[2] == -(-exported.num_computed_tokens // 16)
        dst.import_request(exported)
    assert src.scheduler.device_kv.audit().ok
    drain(src)
    drain(dst)
    for base, r in zip(base_reqs, reqs, strict=True):
        assert r.output_token_ids == base.output_token_ids, f"{r.request_id} continued differently"
    for engine in (src, dst):
        kv = engine.scheduler.device_kv
        assert kv.audit().ok and kv.num_free_blocks == kv.pool.num_blocks


def test_import_refuses_incompatible_layout(tiny_model_dirs):
    src = make_engine(tiny_model_dirs["llama"], block_size=16)
    dst = make_engine(tiny_model_dirs["llama"], block_size=32)
    req = src.add_request(list(range(10, 60)), SamplingParams(temperature=0.0, max_tokens=8))
    src.step()
    exported = src.export_request(req.request_id)
    with pytest.raises(KVCompatibilityError, match="KV layout mismatch"):
        dst.import_request(exported)
    assert dst.scheduler.device_kv.audit().ok and dst.scheduler.device_kv.num_free_blocks == 512


def test_export_of_non_running_request_is_refused(tiny_model_dirs):
    engine = make_engine(tiny_model_dirs["llama"])
    req = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="can only export a running request"):
        engine.export_request(req.request_id)
    with pytest.raises(ValueError, match="can only export"):
        engine.export_request("nope")


def test_stream_text_and_policy_state_survive_the_move(tiny_model_dirs):
    """Deltas streamed by the source, then by the destination, add up to the baseline text;
    the request keeps its MLFQ queue; a duplicate id is refused before blocks move."""
    from tandem.engine.llm import load_tokenizer

    model_dir = tiny_model_dirs["llama"]
    tok = load_tokenizer(model_dir)

    def engine():
        return LLMEngine(
            EngineConfig(
                model=str(model_dir),
                cache=CacheConfig(block_size=16, num_blocks=256),
                scheduler=SchedulerConfig(max_num_batched_tokens=64, policy="mlfq"),
            ),
            tokenizer=tok,
        )

    prompt = tok("Once upon a time, 日本語 and café").input_ids
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    base = engine()
    base.add_request(prompt, params, "r")
    final = None
    while base.has_unfinished_requests():
        for o in base.step():
            final = o
    src, dst = engine(), engine()
    src.add_request(prompt, params, "r")
    streamed = ""
    for _ in range(12):
        streamed += "".join(o.delta_text for o in src.step())
    level = src.scheduler.policy.level_of("r")
    exported = src.export_request("r")
    blocker = dst.add_request([1, 2, 3], SamplingParams(max_tokens=2), "r")  # same id
    with pytest.raises(ValueError, match="duplicate request id"):
        dst.import_request(exported)
    assert dst.scheduler.device_kv.audit().ok and not dst.scheduler.device_kv.block_table("r")
    dst.abort_request(blocker.request_id)
    dst.import_request(exported)
    assert dst.scheduler.policy.level_of("r") == level
    last = None
    while dst.has_unfinished_requests():
        for o in dst.step():
            streamed += o.delta_text
            last = o
    assert last.token_ids == final.token_ids
    assert streamed == final.text == last.text
