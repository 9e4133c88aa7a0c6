"""/openapi.json (router.openapi): a valid OpenAPI 3.1 document whose paths are exactly the
routes the app serves, and whose schemas accept known-good requests, refuse known-bad ones
the same way the parser does, and describe the error body."""

from __future__ import annotations

import json

import jsonschema
import pytest

from router.openai_api import ApiError, Limits, parse_chat, parse_completion, parse_generate
from router.openapi import document
from tests.unit.router.test_openai_api import CountingTokenizer

DOC = document("tiny")
LIMITS = Limits("tiny", max_model_len=4096, vocab_size=100, max_token_chars=4)


def _validator(name: str, doc: dict = DOC) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


def test_document_is_valid_openapi_and_json():
    from openapi_spec_validator import validate

    validate(DOC)
    assert json.loads(json.dumps(DOC)) == DOC


def test_every_route_the_app_serves_is_documented(tiny_llama_dir):
    from router.app import RouterConfig, build_app

    app = build_app(RouterConfig(str(tiny_llama_dir), "tiny", workers=("127.0.0.1:1",)))
    served = {
        (r.resource.canonical, r.method.lower()) for r in app.router.routes() if r.method != "HEAD"
    }
    documented = {
        (path, method)
        for path, item in DOC["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert served == documented


GOOD = [
    ("CompletionRequest", parse_completion, {"prompt": "hello"}),
    ("CompletionRequest", parse_completion,
     {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "top_p": 0.9,
      "top_k": 5, "stop": ["\n", "end"], "seed": 7, "logprobs": 2, "stream": True,
      "stream_options": {"include_usage": True}, "priority": -3, "ignore_eos": True,
      "min_tokens": 1, "stop_token_ids": [2], "presence_penalty": 0.5, "n": 1}),
    ("CompletionRequest", parse_completion, {"prompt": ["one prompt in a batch"]}),
    ("ChatCompletionRequest", parse_chat, {"messages": [{"role": "user", "content": "hi"}]}),
    ("ChatCompletionRequest", parse_chat,
     {"messages": [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
      "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 8, "stop": "x"}),
    ("GenerateRequest", parse_generate, {"prompt_token_ids": [1, 2]}),
    ("GenerateRequest", parse_generate,
     {"prompt_token_ids": [1, 2], "sampling_params": {"max_tokens": 3, "temperature": 0.5}}),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "parse", "body"), GOOD)
def test_known_good_requests_validate_and_parse(schema, parse, body):
    _validator(schema).validate(body)
    parse(body, CountingTokenizer(), LIMITS)


BAD = [
    ("CompletionRequest", parse_completion, {"prompt": ""}),
    ("CompletionRequest", parse_completion, {"prompt": "hi", "stop": ["x"] * 17}),
    ("CompletionRequest", parse_completion, {"prompt": "hi", "logprobs": 21}),
    ("CompletionRequest", parse_completion, {"prompt": "hi", "seed": 2**64}),
    ("CompletionRequest", parse_completion, {"prompt": "hi", "max_tokens": 0}),
    ("CompletionRequest", parse_completion, {"prompt": "hi", "stream": "yes"}),
    ("CompletionRequest", parse_completion, {"prompt": "hi", "n": 0}),
    ("CompletionRequest", parse_completion, {"prompt": "hi", "logit_bias": {"1": 101}}),
    ("ChatCompletionRequest", parse_chat, {"messages": []}),
    ("ChatCompletionRequest", parse_chat, {"messages": [{"role": "robot", "content": "x"}]}),
    ("ChatCompletionRequest", parse_chat,
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True}),
    ("GenerateRequest", parse_generate, {"prompt_token_ids": []}),
    ("GenerateRequest", parse_generate, {"prompt_token_ids": [1], "sampling_params": [1]}),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "parse", "body"), BAD)
def test_known_bad_requests_fail_both_schema_and_parser(schema, parse, body):
    assert not _validator(schema).is_valid(body)
    with pytest.raises(ApiError) as info:
        parse(body, CountingTokenizer(), LIMITS)
    assert 400 <= info.value.status < 500
    _validator("Error").validate(info.value.body())


def test_max_tokens_limit_is_written_into_the_schemas():
    capped = document("tiny", max_tokens=10)
    v = _validator("CompletionRequest", capped)
    assert v.is_valid({"prompt": "hi", "max_tokens": 10})
    assert not v.is_valid({"prompt": "hi", "max_tokens": 11})
