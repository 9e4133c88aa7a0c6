"""Request validation (pure): every hostile body is a 400 naming its field, never a value
that fails later (msgpack, the tokenizer, the sampler) or is silently taken as true."""

from __future__ import annotations

import pytest

from router.openai_api import (
    ApiError,
    Limits,
    check_text,
    parse_chat,
    parse_completion,
    parse_generate,
)

LIMITS = Limits("tiny", max_model_len=64, vocab_size=100, max_token_chars=4)


class CountingTokenizer:
    """One token per word; counts the texts it was asked to encode."""

    def __init__(self) -> None:
        self.encoded = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded += 1
        return [1 + len(w) % 50 for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return " ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:"


def _completion(**body):
    return parse_completion({"prompt": "hello there", **body}, CountingTokenizer(), LIMITS)


def _error(fn, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 2**70), ("seed", -(2**64)), ("priority", 10**30), ("top_k", 2**64),
     ("min_tokens", 2**63)],
)  # fmt: skip
def test_integers_outside_64_bits_are_400_naming_the_field(field, value):
    e = _error(_completion, **{field: value})
    assert e.status == 400 and e.param == field and "64-bit" in e.message


def test_64_bit_integers_at_the_edge_pass():
    assert _completion(seed=2**63 - 1).params.seed == 2**63 - 1
    assert _completion(priority=-(2**63)).priority == -(2**63)


@pytest.mark.parametrize("ids", [[100], [-1], [5, 2**70]])
def test_stop_token_ids_outside_the_vocabulary_are_400(ids):
    e = _error(_completion, stop_token_ids=ids)
    assert e.status == 400 and e.param == "stop_token_ids"


def test_prompt_token_ids_outside_the_vocabulary_are_400():
    e = _error(parse_completion, {"prompt": [1, 2**70]}, CountingTokenizer(), LIMITS)
    assert e.status == 400 and e.param == "prompt"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"ignore_eos": "x"}, "ignore_eos"), ({"ignore_eos": 1}, "ignore_eos"),
     ({"stream": "true"}, "stream"),
     ({"stream": True, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage")],
)  # fmt: skip
def test_booleans_are_strict(body, param):
    e = _error(_completion, **body)
    assert e.status == 400 and e.param == param and "boolean" in e.message


def test_empty_prompt_is_400_with_an_accurate_message():
    e = _error(parse_completion, {"prompt": ""}, CountingTokenizer(), LIMITS)
    assert e.status == 400 and "non-empty" in e.message


@pytest.mark.parametrize(
    "content",
    [[], [{"type": "text"}], [{"type": "text", "text": 5}], [{"type": "image_url"}], 7, None],
)
def test_bad_chat_content_is_400(content):
    body = {"messages": [{"role": "user", "content": content}]}
    e = _error(parse_chat, body, CountingTokenizer(), LIMITS)
    assert e.status == 400 and e.param == "messages"


def test_text_parts_are_joined():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a b"},
                                                      {"type": "text", "text": " c"}]}]}  # fmt: skip
    assert parse_chat(body, CountingTokenizer(), LIMITS).prompt_token_ids


def test_text_too_long_for_the_context_is_refused_before_tokenizing():
    tok = CountingTokenizer()
    too_long = "a " * (LIMITS.max_prompt_chars // 2 + 1)
    e = _error(parse_completion, {"prompt": too_long}, tok, LIMITS)
    assert e.status == 400 and e.param == "prompt" and "characters" in e.message
    chat = {"messages": [{"role": "user", "content": too_long}]}
    assert _error(parse_chat, chat, tok, LIMITS).param == "messages"
    assert tok.encoded == 0


def test_the_character_bound_never_refuses_what_could_fit():
    # Each token is at most max_token_chars characters, so max_model_len tokens are at most
    # max_model_len * max_token_chars characters: such a text must reach the tokenizer.
    assert LIMITS.max_prompt_chars >= LIMITS.max_model_len * LIMITS.max_token_chars


@pytest.mark.parametrize(
    "body",
    [{"prompt": "hi \ud800"}, {"messages": [{"role": "user", "content": "\udfff"}]},
     {"prompt": "x", "stop": ["ok", "\ud83d"]}, {"prompt": "x", "\ud800": 1}],
)  # fmt: skip
def test_lone_surrogates_anywhere_are_400(body):
    e = _error(check_text, body)
    assert e.status == 400 and "surrogate" in e.message


def test_valid_unicode_passes_the_text_check():
    check_text({"prompt": "Café 日本語 🙂", "messages": [{"content": ["ok"]}]})


def test_tiny_temperatures_are_greedy():
    from tandem.request import SamplingParams

    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt_token_ids": "abc"}, "prompt_token_ids"), ({"prompt_token_ids": []}, "prompt_token_ids"),
     ({"prompt_token_ids": [1], "sampling_params": [1]}, "sampling_params"),
     ({"prompt_token_ids": [1], "sampling_params": "x"}, "sampling_params"),
     ({"prompt_token_ids": [100]}, "prompt")],
)  # fmt: skip
def test_generate_bodies_are_checked(body, param):
    e = _error(parse_generate, body, CountingTokenizer(), LIMITS)
    assert e.status == 400 and e.param == param


def test_generate_defaults_to_16_tokens_streamed():
    p = parse_generate({"prompt_token_ids": [1, 2]}, CountingTokenizer(), LIMITS)
    assert p.params.max_tokens == 16 and p.stream and p.prompt_token_ids == [1, 2]


def _chat(**body):
    messages = [{"role": "user", "content": "hi"}]
    return parse_chat({"messages": messages, **body}, CountingTokenizer(), LIMITS)


@pytest.mark.parametrize(
    ("field", "value"),
    [("response_format", {"type": "json_object"}),
     ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
     ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
     ("tool_choice", {"type": "function", "function": {"name": "f"}}),
     ("functions", [{"name": "f"}]), ("guided_json", {}), ("guided_choice", ["a"]),
     ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "low")],
)  # fmt: skip
def test_chat_fields_not_implemented_are_400_naming_them(field, value):
    e = _error(_chat, **{field: value})
    assert e.status == 400 and e.param == field and field in e.message


@pytest.mark.parametrize(
    ("field", "value"),
    [("suffix", "end"), ("best_of", 2), ("best_of", True),
     ("response_format", {"type": "json_object"}), ("guided_regex", "a+")],
)  # fmt: skip
def test_completion_fields_not_implemented_are_400_naming_them(field, value):
    e = _error(_completion, **{field: value})
    assert e.status == 400 and e.param == field


@pytest.mark.parametrize("field", ["frobnicate", "tools", "messages", "top_logprobs"])
def test_unknown_completion_fields_are_400(field):
    e = _error(_completion, **{field: 1})
    assert e.status == 400 and e.param == field and "unrecognized" in e.message


def test_unknown_chat_field_and_stream_option_are_400():
    e = _error(_chat, prompt="x")
    assert e.param == "prompt" and "unrecognized" in e.message
    e = _error(_chat, stream=True, stream_options={"continuous_usage_stats": True})
    assert e.param == "stream_options" and "continuous_usage_stats" in e.message


def test_neutral_values_and_ignored_fields_pass():
    p = _chat(tools=[], tool_choice="none", response_format={"type": "text"}, user="u",
              metadata={"k": "v"}, store=False, parallel_tool_calls=True, logit_bias={})  # fmt: skip
    assert p.n == 1
    p = _completion(echo=False, best_of=1, suffix=None, user="u", logit_bias=None)
    assert p.n == 1


def test_n_is_validated_and_seeds_choices():
    assert _completion(n=4).n == 4
    for bad in (0, 129, True, 1.5):
        assert _error(_completion, n=bad).param == "n"
    p = _completion(n=3, seed=2**63 - 1)
    assert [p.choice_params(i).seed for i in range(3)] == [2**63 - 1, -(2**63), -(2**63) + 1]
    assert _completion(n=2).choice_params(1).seed is None
    assert _error(parse_generate, {"prompt_token_ids": [1], "sampling_params": {"n": 2}},
                  CountingTokenizer(), LIMITS).param == "sampling_params"  # fmt: skip


def test_logit_bias_is_parsed_and_validated():
    assert _completion(logit_bias={"7": -100, "3": 2.5}).params.logit_bias == (
        (3, 2.5),
        (7, -100.0),
    )
    assert _chat(logit_bias={}).params.logit_bias == ()
    for bad in ([1], {"x": 1}, {"100": 1}, {"-1": 1}, {"5": 101}, {"5": True}, {"5": "1"},
                {"1": 1, "01": 2}, {str(i): 1 for i in range(1025)}):  # fmt: skip
        e = _error(_completion, logit_bias=bad)
        assert e.status == 400 and e.param == "logit_bias", bad


class DecodingTokenizer(CountingTokenizer):
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids)


def test_echo_text_and_echo_with_logprobs_refused():
    tok = DecodingTokenizer()
    assert parse_completion({"prompt": "hi there", "echo": True}, tok, LIMITS).echo_text == (
        "hi there"
    )
    assert parse_completion({"prompt": [3, 4], "echo": True}, tok, LIMITS).echo_text == "t3 t4"
    assert parse_completion({"prompt": "hi", "echo": False}, tok, LIMITS).echo_text is None
    e = _error(parse_completion, {"prompt": "hi", "echo": True, "logprobs": 1}, tok, LIMITS)
    assert e.status == 400 and e.param == "echo"
    assert _error(parse_completion, {"prompt": "hi", "echo": 1}, tok, LIMITS).param == "echo"
    assert _error(_chat, echo=True).param == "echo"  # completions only


def test_tokenize_and_detokenize_bodies():
    from router.openai_api import parse_detokenize, parse_tokenize

    tok = DecodingTokenizer()
    out = parse_tokenize({"prompt": "a bb ccc", "return_token_strs": True}, tok, LIMITS)
    assert out == {"count": 3, "max_model_len": 64, "tokens": [2, 3, 4],
                   "token_strs": ["t2", "t3", "t4"]}  # fmt: skip
    chat = parse_tokenize({"messages": [{"role": "user", "content": "x"}]}, tok, LIMITS)
    assert chat["count"] == 3  # "user: x assistant:"
    assert parse_detokenize({"tokens": [5, 6]}, tok, LIMITS) == {"prompt": "t5 t6"}
    for body, param in [({}, "prompt"), ({"prompt": 3}, "prompt"), ({"prompt": "a", "x": 1}, "x"),
                        ({"prompt": "a", "messages": []}, "prompt"),
                        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages")]:  # fmt: skip
        assert _error(parse_tokenize, body, tok, LIMITS).param == param
    for body in ({"tokens": [100]}, {"tokens": "ab"}, {}):
        assert _error(parse_detokenize, body, tok, LIMITS).param == "tokens"
    assert _error(parse_detokenize, {"tokens": [1], "model": "gpt"}, tok, LIMITS).status == 404
