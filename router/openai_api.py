"""OpenAI request parsing and validation (pure): JSON body → token ids + SamplingParams.

Every problem raises ``ApiError`` with an HTTP status, a message and the offending
parameter, which the app turns into OpenAI's error JSON. Accepted: temperature, top_p,
top_k, min_p, max_tokens / max_completion_tokens, stop, seed, logprobs / top_logprobs,
presence/frequency/repetition penalty, n=1, stream, stream_options.include_usage, and the
extensions priority, ignore_eos, min_tokens, stop_token_ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.request import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass
class ParsedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    priority: int
    chat: bool
    logprobs: int | None  # top-n wanted (None = off)


_KNOWN = {
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "priority", "ignore_eos",
    "min_tokens", "stop_token_ids", "user", "echo", "best_of", "logit_bias", "suffix",
}  # fmt: skip
_UNSUPPORTED = {"echo": False, "best_of": 1, "logit_bias": None, "suffix": None}


def _number(body: dict, key: str, default: Any, kind: type = float) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", key)
    return kind(value)


def _check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(
            404, f"model {model!r} does not exist; this server serves {served!r}", "model"
        )


def _common(
    body: dict, default_max_tokens: int, max_model_len: int, prompt_len: int, chat: bool
) -> tuple:
    for key, neutral in _UNSUPPORTED.items():
        if body.get(key, neutral) not in (neutral, None):
            raise ApiError(400, f"'{key}' is not supported", key)
    if _number(body, "n", 1, int) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{key}' must be an integer >= 1", key)
    if prompt_len + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_len} and {key} is {max_tokens}",
            key,
        )
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stop = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
    if chat:
        lp = body.get("logprobs")
        if lp not in (None, True, False):
            raise ApiError(400, "'logprobs' must be a boolean for chat", "logprobs")
        top = _number(body, "top_logprobs", 0, int)
        logprobs = top if lp else None
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
            raise ApiError(400, "'logprobs' must be an integer", "logprobs")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise ApiError(400, "'top_k' must be an integer", "top_k")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in stop_ids
    ):
        raise ApiError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=_number(body, "min_tokens", 0, int),
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=None if top_k in (None, -1, 0) else top_k,
            min_p=_number(body, "min_p", 0.0),
            seed=_number(body, "seed", None, int),
            presence_penalty=_number(body, "presence_penalty", 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            stop=stop,
            stop_token_ids=tuple(stop_ids),
            ignore_eos=bool(body.get("ignore_eos", False)),
            logprobs=logprobs,
        )
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param) from None
    priority = _number(body, "priority", 0, int)
    return params, stream, bool(stream_options.get("include_usage", False)), priority, logprobs


def parse_completion(
    body: Any, tokenizer: Any, served: str, max_model_len: int, vocab_size: int
) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    _check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(
                400, f"prompt token ids must be in [0, {vocab_size}); got {bad[:5]}", "prompt"
            )
        ids = list(prompt)
    else:
        raise ApiError(
            400,
            "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
            "prompt",
        )
    if not ids:
        raise ApiError(400, "'prompt' must not be empty", "prompt")
    params, stream, usage, prio, logprobs = _common(body, 16, max_model_len, len(ids), chat=False)
    return ParsedRequest(ids, params, stream, usage, prio, chat=False, logprobs=logprobs)


def parse_chat(body: Any, tokenizer: Any, served: str, max_model_len: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    _check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "user",
            "assistant",
            "developer",
            "tool",
        ):
            raise ApiError(
                400,
                f"messages[{i}] needs a 'role' of system, user, assistant, developer or tool",
                "messages",
            )
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(
                    400, f"messages[{i}]: only text content parts are supported", "messages"
                )
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        clean.append(
            {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        )
    try:
        text = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
    except Exception as e:  # template errors are the request's problem
        raise ApiError(400, f"chat template: {e}", "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    default = max(1, max_model_len - len(ids))
    params, stream, usage, prio, logprobs = _common(
        body, default, max_model_len, len(ids), chat=True
    )
    return ParsedRequest(ids, params, stream, usage, prio, chat=True, logprobs=logprobs)
