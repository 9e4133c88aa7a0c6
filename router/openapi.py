"""The router's OpenAPI 3.1 document, served at ``GET /openapi.json`` (pure).

One place describes what the router accepts: every route ``router.app`` serves, the
request body schemas of the OpenAI and native endpoints, and the error JSON every 4xx/5xx
carries. The schemas mirror ``router.openai_api``'s validation and take its bounds from
there (``MAX_STOP``, ``MAX_LOGPROBS``, the 64-bit integer range, the chat roles), so a
body the schema accepts passes the type and range checks; what depends on the model at
run time (the context length, the vocabulary, the tokenized prompt length) is checked
only by the router. Fields are optional unless ``required`` says so; unknown fields are
ignored by the router, so objects allow them.

Contract (tests/unit/router/test_openapi.py): the document is valid OpenAPI 3.1, its
paths are exactly the app's routes (method for method), and known-good requests validate
against its schemas.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from router.openai_api import (
    _ROLES,
    INT64_MAX,
    INT64_MIN,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
)

_INT64 = {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _sampling(max_tokens: int | None) -> dict[str, Any]:
    """The sampling fields shared by completions, chat and /generate's sampling_params."""
    count: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
    if max_tokens is not None:
        count["maximum"] = max_tokens
    return {
        "max_tokens": count,
        "max_completion_tokens": count,
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {**_INT64, "description": "-1 or 0: off"},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
        "logit_bias": {
            "type": "object",
            "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "token id (inside the vocabulary) -> bias added to its logit",
        },
        "stop": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "maxItems": MAX_STOP,
                    "items": {"type": "string", "minLength": 1},
                },
            ]
        },
        "seed": _INT64,
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "priority": {**_INT64, "description": "admission priority (extension)"},
        "ignore_eos": {"type": "boolean"},
        "min_tokens": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
        "stop_token_ids": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
            "description": "token ids, each inside the vocabulary",
        },
        "user": {"type": "string"},
        "metadata": {"description": "accepted and ignored"},
        "store": {"description": "accepted and ignored"},
        "service_tier": {"description": "accepted and ignored"},
    }


def _openai_common(served: str, max_tokens: int | None) -> dict[str, Any]:
    return {
        "model": {"type": "string", "description": f"must be {served!r} when given"},
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
        },
        **_sampling(max_tokens),
    }


def schemas(served: str, max_tokens: int | None = None) -> dict[str, Any]:
    """The component schemas: requests (by endpoint) and the error body."""
    token_ids = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
    }
    prompt_one = {"oneOf": [{"type": "string", "minLength": 1}, token_ids]}
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": list(_ROLES)},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "minItems": 1, "items": text_part},
                    {"type": "null", "description": "an assistant message with tool_calls"},
                ]
            },
            "tool_calls": {"type": "array", "description": "assistant: the calls it made"},
            "tool_call_id": {"type": "string", "description": "tool: the call answered"},
            "name": {"type": "string"},
        },
    }
    completion = {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            **_openai_common(served, max_tokens),
            "prompt": {
                "oneOf": [
                    prompt_one["oneOf"][0],
                    prompt_one["oneOf"][1],
                    {"type": "array", "minItems": 1, "maxItems": 1, "items": prompt_one},
                ],
                "description": "one prompt: text or token ids (a batch of one is accepted)",
            },
            "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
            "echo": {"type": "boolean", "description": "not with logprobs"},
            "best_of": {"const": 1},
        },
    }
    chat = {
        "type": "object",
        "required": ["messages"],
        "properties": {
            **_openai_common(served, max_tokens),
            "messages": {"type": "array", "minItems": 1, "items": message},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
            "tools": {"type": "array", "description": "function tools, rendered by the chat "
                      "template (streaming with tools is refused)"},
            "tool_choice": {"description": "'auto' or 'none' (forcing a call is refused)"},
            "parallel_tool_calls": {"type": "boolean"},
        },
    }
    tokenize = {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "messages": {"type": "array", "minItems": 1, "items": message},
            "tools": {"type": "array"},
            "add_special_tokens": {"type": "boolean"},
            "add_generation_prompt": {"type": "boolean"},
            "return_token_strs": {"type": "boolean"},
        },
        "description": "exactly one of prompt or messages",
    }
    detokenize = {
        "type": "object",
        "required": ["tokens"],
        "properties": {"model": {"type": "string"}, "tokens": token_ids},
    }
    generate = {
        "type": "object",
        "required": ["prompt_token_ids"],
        "properties": {
            "prompt_token_ids": token_ids,
            "sampling_params": {
                "type": "object",
                "properties": {
                    **_sampling(max_tokens),
                    "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
                },
            },
        },
    }
    migrate = {
        "type": "object",
        "required": ["request_id"],
        "properties": {
            "request_id": {"type": "string", "minLength": 1},
            "to": {"type": "string", "description": "worker address or id"},
            "min_copy_stages": {"type": "integer", "minimum": 0},
            "fault": {"type": "string", "description": "tests only: SIDE:POINT"},
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"enum": ["invalid_request_error", "server_error"]},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["integer", "string"]},
                },
            }
        },
    }
    return {
        "CompletionRequest": completion,
        "ChatCompletionRequest": chat,
        "GenerateRequest": generate,
        "TokenizeRequest": tokenize,
        "DetokenizeRequest": detokenize,
        "MigrateRequest": migrate,
        "Error": error,
    }


def _op(summary: str, body: str | None = None, security: str | None = "apiKey") -> dict:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "success (SSE with text/event-stream when streamed)"},
            "default": {
                "description": "error (4xx, 5xx)",
                "content": {"application/json": {"schema": _ref("Error")}},
            },
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if security is not None:
        op["security"] = [{security: []}]
    return op


def document(served: str, max_tokens: int | None = None) -> dict[str, Any]:
    """The whole OpenAPI document for a router serving ``served`` (``max_tokens``: the
    ``--max-tokens-limit``, written into the schemas' bounds)."""
    admin, open_ = "adminKey", None
    drain = {
        "parameters": [
            {"name": "worker", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "post": _op("drain a decode worker (migrate everything off it)", security=admin),
        "get": _op("a drain's progress", security=admin),
        "delete": _op("stop draining a worker", security=admin),
    }
    paths = {
        "/v1/completions": {"post": _op("text completion", "CompletionRequest")},
        "/v1/chat/completions": {"post": _op("chat completion", "ChatCompletionRequest")},
        "/generate": {"post": _op("native: token ids in, token ids streamed", "GenerateRequest")},
        "/v1/models": {"get": _op("the served model")},
        "/v1/models/{model_id}": {
            "parameters": [
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": _op("one model's card (404 for another id)"),
        },
        "/tokenize": {"post": _op("text or messages -> token ids (as vLLM)", "TokenizeRequest")},
        "/detokenize": {"post": _op("token ids -> text (as vLLM)", "DetokenizeRequest")},
        "/health": {"get": _op("readiness: 200 when a request can be served", security=open_)},
        "/health/ready": {"get": _op("readiness (as /health)", security=open_)},
        "/health/live": {"get": _op("liveness: the event loop answers", security=open_)},
        "/metrics": {"get": _op("Prometheus metrics", security="metricsKey")},
        "/openapi.json": {"get": _op("this document", security=open_)},
        "/admin/migrate": {"post": _op("migrate a request", "MigrateRequest", security=admin)},
        "/admin/drain/{worker}": drain,
        "/admin/workers": {"get": _op("decode workers' load", security=admin)},
    }
    bearer = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tandem router",
            "version": "1",
            "description": "OpenAI-compatible API and Tandem's native and admin endpoints. "
            "Keys (router.auth): apiKey when the router has --api-key, adminKey when it has "
            "--admin-key (else /admin/* only on a loopback-only router), metricsKey when it "
            "has --metrics-key.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas(served, max_tokens),
            "securitySchemes": {"apiKey": bearer, "adminKey": bearer, "metricsKey": bearer},
        },
    }


def routes(served: str, max_tokens: int | None = None) -> list[web.RouteDef]:
    """``GET /openapi.json``, the document built once."""
    doc = document(served, max_tokens)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(doc)

    return [web.get("/openapi.json", openapi)]
