"""The offline API end to end: ``LLM(model=DIR).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=tiny_llama_dir, device="cpu", dtype="float32", max_num_batched_tokens=64)


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_strings_and_token_ids_come_back_in_input_order(llm):
    tok = llm.get_tokenizer()
    prompts = ["Hello there, how are you?", [5, 6, 7, 8, 9, 10], "日本語とcafé 🙂", "a"]
    outs = llm.generate(prompts, GREEDY)
    assert len(outs) == 4
    assert outs[0].prompt == prompts[0] and outs[1].prompt is None
    assert outs[1].prompt_token_ids == prompts[1]
    assert outs[0].prompt_token_ids == tok(prompts[0]).input_ids
    for o in outs:
        assert len(o.token_ids) == 24 and o.finish_reason == "length"
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    # Each output equals the output of the same prompt run alone.
    alone = llm.generate(prompts[2], GREEDY)[0]
    assert alone.token_ids == outs[2].token_ids


def test_stop_string_truncates_text_and_finishes(llm):
    base = llm.generate(
        "Once upon a time", SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    )[0]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "pick a non-blank stop string"
    first = text.find(stop)
    out = llm.generate(
        "Once upon a time",
        SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, stop=[stop]),
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    kept = llm.generate(
        "Once upon a time",
        SamplingParams(
            temperature=0.0,
            max_tokens=32,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
    )[0]
    assert kept.text == text[: first + len(stop)]


def test_stop_token_id_and_min_tokens(llm):
    base = llm.generate([11, 12, 13], GREEDY)[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.generate(
        [11, 12, 13], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id])
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    assert out.stop_reason == stop_id
    # min_tokens masks the stop id until it is reached, so the output changes after `first`.
    longer = llm.generate(
        [11, 12, 13],
        SamplingParams(
            temperature=0.0, max_tokens=24, stop_token_ids=[stop_id], min_tokens=first + 2
        ),
    )[0]
    assert len(longer.token_ids) >= first + 2


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=42, max_tokens=20, ignore_eos=True
    )
    alone = llm.generate("The weather today", params)[0]
    crowd = llm.generate(
        ["noise one", "The weather today", [3, 4, 5] * 30],
        [
            SamplingParams(temperature=1.0, max_tokens=30),
            params,
            SamplingParams(temperature=0.7, max_tokens=10),
        ],
    )[1]
    assert crowd.token_ids == alone.token_ids
    other = llm.generate(
        "The weather today",
        SamplingParams(temperature=1.0, seed=43, max_tokens=20, ignore_eos=True),
    )[0]
    assert other.token_ids != alone.token_ids


def test_logprobs_are_returned_per_token(llm):
    out = llm.generate(
        [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    )[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for token, (lp, top) in zip(out.token_ids, out.logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == token  # greedy picks the top-1
        assert lp == pytest.approx(top[0][1]) and lp <= 0.0


def test_bad_inputs_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate([[1, 2, 10**9]], GREEDY)
    with pytest.raises(ValueError, match="exceeds the maximum context length"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    # Nothing was left behind by the failed calls.
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.device_kv.audit().ok
