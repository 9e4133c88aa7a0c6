"""Operator input limits in request parsing (router.openai_api.Limits): every one a 400
naming its field, and requests at the limit pass."""

from __future__ import annotations

import pytest

from router.openai_api import (
    MAX_LOGPROBS,
    MAX_STOP,
    ApiError,
    Limits,
    parse_chat,
    parse_completion,
    parse_generate,
)
from tests.unit.router.test_openai_api import CountingTokenizer

CAPPED = Limits("tiny", max_model_len=64, vocab_size=100, max_token_chars=4,
                max_prompt_tokens=8, max_tokens=10)  # fmt: skip


def _error(fn, body, limits=CAPPED) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(body, CountingTokenizer(), limits)
    return info.value


def test_prompt_over_max_prompt_tokens_is_400_prompt():
    e = _error(parse_completion, {"prompt": " ".join(["w"] * 9)})
    assert e.status == 400 and e.param == "prompt" and "limit of 8" in e.message
    e = _error(parse_completion, {"prompt": list(range(1, 10))})
    assert e.status == 400 and e.param == "prompt"
    e = _error(parse_generate, {"prompt_token_ids": list(range(1, 10))})
    assert e.status == 400 and e.param == "prompt"
    assert parse_completion({"prompt": list(range(1, 9))}, CountingTokenizer(), CAPPED)


def test_chat_over_max_prompt_tokens_is_400_messages():
    body = {"messages": [{"role": "user", "content": "a b c d e f g h"}]}
    e = _error(parse_chat, body)
    assert e.status == 400 and e.param == "messages"


def test_prompt_text_far_past_the_cap_is_refused_before_tokenizing():
    tok = CountingTokenizer()
    with pytest.raises(ApiError) as info:
        parse_completion({"prompt": "x" * (8 * 4 * 4 + 1)}, tok, CAPPED)
    assert info.value.param == "prompt" and tok.encoded == 0


@pytest.mark.parametrize(
    "key, parse, body",
    [
        ("max_tokens", parse_completion, {"prompt": "hi"}),
        ("max_tokens", parse_chat, {"messages": [{"role": "user", "content": "hi"}]}),
        # a chat field only (OpenAI's completions API has no max_completion_tokens)
        ("max_completion_tokens", parse_chat, {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_max_tokens_over_the_limit_is_400_naming_it(key, parse, body):
    e = _error(parse, {**body, key: 11})
    assert e.status == 400 and e.param == key and "at most 10" in e.message
    ok = parse({**body, key: 10}, CountingTokenizer(), CAPPED)
    assert ok.params.max_tokens == 10


def test_default_max_tokens_respects_the_limit():
    chat = parse_chat(
        {"messages": [{"role": "user", "content": "hi"}]}, CountingTokenizer(), CAPPED
    )
    assert chat.params.max_tokens == 10
    small = Limits("tiny", 64, 100, 4, max_tokens=3)
    assert parse_completion({"prompt": "hi"}, CountingTokenizer(), small).params.max_tokens == 3


def test_too_many_stop_strings_is_400_stop():
    e = _error(parse_completion, {"prompt": "hi", "stop": ["x"] * (MAX_STOP + 1)})
    assert e.status == 400 and e.param == "stop" and str(MAX_STOP) in e.message
    ok = parse_completion({"prompt": "hi", "stop": ["x"] * MAX_STOP}, CountingTokenizer(), CAPPED)
    assert len(ok.params.stop) == MAX_STOP


@pytest.mark.parametrize("value", [MAX_LOGPROBS + 1, -1, 10**6])
def test_logprobs_out_of_range_is_400_logprobs(value):
    e = _error(parse_completion, {"prompt": "hi", "logprobs": value})
    assert e.status == 400 and e.param == "logprobs"


@pytest.mark.parametrize("value", [MAX_LOGPROBS + 1, -1])
def test_top_logprobs_out_of_range_is_400_top_logprobs(value):
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
            "top_logprobs": value}  # fmt: skip
    e = _error(parse_chat, body)
    assert e.status == 400 and e.param == "top_logprobs"


def test_logprobs_at_the_limit_pass():
    ok = parse_completion({"prompt": "hi", "logprobs": MAX_LOGPROBS}, CountingTokenizer(), CAPPED)
    assert ok.logprobs == MAX_LOGPROBS
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
            "top_logprobs": MAX_LOGPROBS}  # fmt: skip
    assert parse_chat(body, CountingTokenizer(), CAPPED).logprobs == MAX_LOGPROBS


def test_router_config_refuses_nonpositive_limits(tmp_path):
    from router.app import RouterConfig

    for kw in ({"max_prompt_tokens": 0}, {"max_tokens_limit": -1}):
        with pytest.raises(ValueError, match="must be >= 1"):
            RouterConfig(str(tmp_path), "m", workers=("127.0.0.1:1",), **kw)
