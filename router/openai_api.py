"""OpenAI request parsing and validation (pure): JSON body → token ids + SamplingParams.

Every problem raises ``ApiError`` with an HTTP status, a message and the offending
parameter, which the app turns into OpenAI's error JSON. Accepted: temperature, top_p,
top_k, min_p, max_tokens / max_completion_tokens, stop, seed, logprobs / top_logprobs,
presence/frequency/repetition penalty, n, stream, stream_options.include_usage, and the
extensions priority, ignore_eos, min_tokens, stop_token_ids; logit_bias; echo (not
with logprobs: no prompt logprobs are computed). ``check_fields`` sorts every
other field: accepted-and-ignored (``IGNORED``), not implemented (``REFUSED``: a 400
unless at its neutral value) or unknown (a 400).

Limits (each a 400 naming its field): the prompt's tokens (the context, or
``Limits.max_prompt_tokens``), ``max_tokens`` (must fit the context with the prompt, and
be at most ``Limits.max_tokens``), at most ``MAX_STOP`` stop strings, ``logprobs`` /
``top_logprobs`` in [0, ``MAX_LOGPROBS``].

Contract: whatever a client sends, parsing either returns a request every later stage can
carry (every integer fits the 64-bit wire format, every token id is inside the vocabulary,
every string is valid Unicode, booleans are booleans) or raises ``ApiError`` (4xx). Text
that cannot fit the context is refused from its length in characters, before tokenizing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from router.tools import ToolError, check_tool_calls, check_tools, detect_format
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
    n: int = 1  # choices: n samples of the prompt, choice i seeded with seed + i
    echo_text: str | None = None  # completions' echo: the prompt text, before each choice
    tool_format: str | None = None  # chat with tools: find calls in this format (router.tools)
    parallel_tool_calls: bool = True  # False: at most the first call found is returned

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index``'s parameters: a seeded request gives choice i the seed
        ``seed + i`` (wrapping inside 64 bits), so choices differ yet each is reproducible;
        an unseeded one leaves every choice unseeded."""
        seed = self.params.seed
        if seed is None or index == 0:
            return self.params
        seed = (seed + index - INT64_MIN) % 2**64 + INT64_MIN
        return replace(self.params, seed=seed)


# Every top-level field a body may carry, by what the server does with it. A field in
# none of these sets is refused (400 naming it): nothing a client sends is silently
# dropped. README's API table lists the same sets.
SUPPORTED_COMPLETION = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream",
    "stream_options", "stop", "seed", "logprobs", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "priority", "ignore_eos", "min_tokens", "stop_token_ids", "echo",
    "best_of", "logit_bias", "suffix", "response_format", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "structured_outputs",
})  # fmt: skip
SUPPORTED_CHAT = (SUPPORTED_COMPLETION - {"prompt", "echo", "best_of", "suffix"}) | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "prediction", "audio", "modalities",
    "web_search_options", "reasoning_effort",
}  # fmt: skip
# Accepted and ignored: they cannot change the tokens generated.
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
# Known OpenAI / vLLM fields not implemented, each accepted only at its neutral value(s):
# anything else is a 400 naming the field.
REFUSED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
}


def check_fields(body: dict, chat: bool) -> None:
    """Refuse (400, naming the field) any field that is unknown for this endpoint, or known
    but not implemented and set to a value that would change the output."""
    supported = SUPPORTED_CHAT if chat else SUPPORTED_COMPLETION
    for key, value in body.items():
        if key in IGNORED or (key in supported and key not in REFUSED):
            continue
        if key in supported:  # known, not implemented: only its neutral values pass
            if any(type(value) is type(n) and value == n for n in REFUSED[key]):
                continue
            raise ApiError(
                400, f"'{key}' is not supported by this server (only its default is)", key
            )
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        raise ApiError(400, f"unrecognized request argument '{key}' for {endpoint}", key)


MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # logprobs (completions) / top_logprobs (chat) per token

# Integers cross msgpack (signed or unsigned 64-bit); anything wider is refused up front.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # choices per request


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the served name and the workers' limits.

    ``max_token_chars`` is the longest token of the vocabulary in characters (bytes for a
    byte-level BPE): a text of more than ``max_model_len * max_token_chars * 4`` characters
    cannot fit the context whatever its tokenization (the 4 allows for normalizers that
    compose characters), so it is refused without tokenizing it.
    """

    served: str
    max_model_len: int
    vocab_size: int
    max_token_chars: int = 64
    # The operator's caps: --max-prompt-tokens (None: the context) and --max-tokens-limit,
    # the largest max_tokens accepted (None: any that fits the context).
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None

    @property
    def prompt_token_limit(self) -> int:
        """The most prompt tokens accepted: the context, or the operator's cap if lower."""
        cap = self.max_prompt_tokens
        return self.max_model_len if cap is None else min(cap, self.max_model_len)

    @property
    def max_prompt_chars(self) -> int:
        return max(self.prompt_token_limit, 1) * max(self.max_token_chars, 1) * 4


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
    if kind is int and not INT64_MIN <= value <= INT64_MAX:
        raise ApiError(400, f"'{key}' must be a 64-bit integer (in [-2**63, 2**63 - 1])", key)
    return kind(value)


def _bool(body: dict, key: str, default: bool, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        name = param or key
        raise ApiError(400, f"'{name}' must be a boolean (true or false)", name)
    return value


def _token_ids(value: Any, key: str, vocab_size: int, allow_empty: bool) -> list[int]:
    """A list of token ids, each in [0, vocab_size)."""
    if (
        not isinstance(value, list)
        or (not value and not allow_empty)
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        what = "a list" if allow_empty else "a non-empty list"
        raise ApiError(400, f"'{key}' must be {what} of integers", key)
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"'{key}' token ids must be in [0, {vocab_size}); got {bad[:5]}", key)
    return value


def check_text(body: Any) -> None:
    """Refuse any string in the parsed JSON body that is not valid Unicode (a lone UTF-16
    surrogate such as ``"\\ud800"`` parses in Python but cannot be tokenized or echoed as
    UTF-8). Iterative: a deep body cannot overflow the stack here."""
    for path, text in _strings(body):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = text[e.start]
            raise ApiError(
                400,
                f"{path or 'body'} contains a lone UTF-16 surrogate (U+{ord(bad):04X}): "
                "text must be valid Unicode",
                path.split("[", 1)[0].split(".", 1)[0] or None,
            ) from None


def _strings(body: Any) -> Iterator[tuple[str, str]]:
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                yield path, value
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and not k.isascii():
                    yield f"{path}.<key>" if path else "<key>", k
                stack.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))


MAX_LOGIT_BIAS = 1024  # entries per request


def _logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: an object mapping token ids (as strings, or integers) to a
    bias in [-100, 100]; ``None`` or ``{}`` is none."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object of token id -> bias", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' may have at most {MAX_LOGIT_BIAS} entries", "logit_bias")
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        token = key if isinstance(key, int) else None
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 20:
            token = int(key)
        if token is None or not 0 <= token < vocab_size:
            raise ApiError(
                400, f"'logit_bias' keys must be token ids in [0, {vocab_size}); got {key!r}",
                "logit_bias",
            )  # fmt: skip
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(
                400, f"'logit_bias' values must be numbers in [-100, 100]; got {bias!r}",
                "logit_bias",
            )  # fmt: skip
        if token in pairs:
            raise ApiError(400, f"'logit_bias' names token {token} twice", "logit_bias")
        pairs[token] = float(bias)
    return tuple(sorted(pairs.items()))


def _check_length(chars: int, limits: Limits, what: str) -> None:
    if chars > limits.max_prompt_chars:
        raise ApiError(
            400,
            f"{what} is {chars} characters long, more than {limits.prompt_token_limit} "
            "tokens (this server's prompt limit) could hold",
            "messages" if what == "the conversation" else "prompt",
        )


def _check_prompt_tokens(n: int, limits: Limits, param: str) -> None:
    """Refuse a prompt longer than the operator's cap (``--max-prompt-tokens``); one that
    merely does not fit the context with max_tokens is ``_common``'s 400."""
    cap = limits.max_prompt_tokens
    if cap is not None and n > cap:
        raise ApiError(
            400,
            f"the prompt has {n} tokens, more than this server's limit of {cap} prompt tokens",
            param,
        )


def _check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(
            404, f"model {model!r} does not exist; this server serves {served!r}", "model"
        )


def _common(
    body: dict, default_max_tokens: int, limits: Limits, prompt_len: int, chat: bool
) -> tuple:
    max_model_len = limits.max_model_len
    check_fields(body, chat)
    n = _number(body, "n", 1, int)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be an integer in [1, {MAX_N}]", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{key}' must be an integer >= 1", key)
    elif limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(
            400, f"'{key}' is {max_tokens}; this server accepts at most {limits.max_tokens}", key
        )
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
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise ApiError(
                400, f"'stop' has {len(stop)} strings; at most {MAX_STOP} are accepted", "stop"
            )
        stop = tuple(stop)
    else:
        raise ApiError(
            400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop"
        )
    if chat:
        lp = body.get("logprobs")
        if lp not in (None, True, False):
            raise ApiError(400, "'logprobs' must be a boolean for chat", "logprobs")
        top = _number(body, "top_logprobs", 0, int)
        if not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(
                400, f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs"
            )
        logprobs = top if lp else None
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None and (
            isinstance(logprobs, bool)
            or not isinstance(logprobs, int)
            or not 0 <= logprobs <= MAX_LOGPROBS
        ):
            raise ApiError(400, f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "logprobs")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    for key in stream_options:
        if key != "include_usage":
            raise ApiError(
                400,
                f"'stream_options.{key}' is not supported (only include_usage is)",
                "stream_options",
            )
    stream = _bool(body, "stream", False)
    include_usage = _bool(stream_options, "include_usage", False, "stream_options.include_usage")
    top_k = _number(body, "top_k", None, int)
    logit_bias = _logit_bias(body.get("logit_bias"), limits.vocab_size)
    stop_ids = body.get("stop_token_ids")
    stop_ids = _token_ids(
        [] if stop_ids is None else stop_ids, "stop_token_ids", limits.vocab_size, True
    )
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
            ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs,
            logit_bias=logit_bias,
        )
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param) from None
    priority = _number(body, "priority", 0, int)
    return params, stream, include_usage, priority, logprobs, n


def parse_completion(body: Any, tokenizer: Any, limits: Limits) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    _check_model(body, limits.served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        _check_length(len(prompt), limits, "the prompt")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt:
        if len(prompt) > limits.max_model_len:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens; this model's maximum context length "
                f"is {limits.max_model_len}",
                "prompt",
            )
        ids = list(_token_ids(prompt, "prompt", limits.vocab_size, False))
    else:
        raise ApiError(
            400,
            "'prompt' must be a non-empty string or a non-empty list of token ids "
            "(one prompt per request)",
            "prompt",
        )
    if not ids:
        raise ApiError(400, "'prompt' tokenizes to no tokens", "prompt")
    _check_prompt_tokens(len(ids), limits, "prompt")
    default = min(16, limits.max_tokens or 16)
    params, stream, usage, prio, logprobs, n = _common(
        body, default, limits, len(ids), chat=False
    )
    echo_text = None
    if _bool(body, "echo", False):
        if logprobs is not None:
            # The engine computes no prompt logprobs: echo's logprobs would be half-empty.
            raise ApiError(400, "'echo' together with 'logprobs' is not supported", "echo")
        echo_text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
    return ParsedRequest(ids, params, stream, usage, prio, chat=False, logprobs=logprobs, n=n,
                         echo_text=echo_text)  # fmt: skip


_ROLES = ("system", "user", "assistant", "developer", "tool")


def _message_text(i: int, content: Any) -> str:
    """A message's content as one string: a string, or a non-empty list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: text ones only
        if not content:
            raise ApiError(400, f"messages[{i}].content must not be an empty list", "messages")
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(
                    400, f"messages[{i}]: only text content parts are supported", "messages"
                )
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}] needs a 'text' string", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(
        400, f"messages[{i}].content must be a string or a list of text parts", "messages"
    )


def _clean_message(i: int, m: dict, template: str) -> dict[str, Any]:
    """One history message as the chat template gets it."""
    role = "system" if m["role"] == "developer" else m["role"]
    calls = m.get("tool_calls")
    if role == "assistant" and calls:
        if "tool_calls" not in template:
            raise ApiError(400, "this model's chat template does not render tool_calls", "messages")
        try:
            calls = check_tool_calls(i, calls)
        except ToolError as e:
            raise ApiError(400, str(e), "messages") from None
        content = m.get("content")
        text = "" if content is None else _message_text(i, content)
        return {"role": role, "content": text, "tool_calls": calls}
    if calls:
        raise ApiError(400, f"messages[{i}]: only assistant messages have tool_calls", "messages")
    out: dict[str, Any] = {"role": role, "content": _message_text(i, m.get("content"))}
    if role == "tool":
        if "tool" not in template.replace("tools", ""):
            raise ApiError(400, "this model's chat template does not render tool messages",
                           "messages")  # fmt: skip
        call_id = m.get("tool_call_id")
        if call_id is not None and not isinstance(call_id, str):
            raise ApiError(400, f"messages[{i}].tool_call_id must be a string", "messages")
        out["tool_call_id"] = call_id or ""
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def _chat_text(body: dict, tokenizer: Any, limits: Limits, add_generation_prompt: bool) -> str:
    """The conversation in ``body["messages"]`` (and ``body["tools"]``) through the chat
    template. Tool messages, assistant ``tool_calls`` and tools are refused (400) when the
    template does not mention them: it would drop them silently."""
    template = getattr(tokenizer, "chat_template", None) or ""
    tools = body.get("tools")
    try:
        tools = check_tools(tools) if tools else None
    except ToolError as e:
        raise ApiError(400, str(e), "tools") from None
    if tools and "tools" not in template:
        raise ApiError(400, "this model's chat template does not render tools", "tools")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(
                400,
                f"messages[{i}] needs a 'role' of system, user, assistant, developer or tool",
                "messages",
            )
        clean.append(_clean_message(i, m, template))
    _check_length(
        sum(len(m["content"]) for m in clean) + len(json.dumps(tools or [])),
        limits,
        "the conversation",
    )
    kwargs = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(
            clean, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as e:  # template errors are the request's problem
        raise ApiError(400, f"chat template: {e}", "messages") from None
    return text


def parse_chat(body: Any, tokenizer: Any, limits: Limits) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    _check_model(body, limits.served)
    text = _chat_text(body, tokenizer, limits, True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    _check_prompt_tokens(len(ids), limits, "messages")
    default = max(1, limits.max_model_len - len(ids))
    if limits.max_tokens is not None:
        default = min(default, limits.max_tokens)
    params, stream, usage, prio, logprobs, n = _common(body, default, limits, len(ids), chat=True)
    tool_format = _tool_format(body, tokenizer, stream)
    return ParsedRequest(ids, params, stream, usage, prio, chat=True, logprobs=logprobs, n=n,
                         tool_format=tool_format,
                         parallel_tool_calls=_bool(body, "parallel_tool_calls", True))  # fmt: skip


def _tool_format(body: dict, tokenizer: Any, stream: bool) -> str | None:
    """How to find tool calls in the output: None unless ``tools`` are given and
    ``tool_choice`` is ``auto`` (their default); ``none`` renders them but parses nothing;
    ``required`` and a named function need structured outputs (refused)."""
    choice = body.get("tool_choice")
    if not body.get("tools"):
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    if choice == "none":
        return None
    if choice not in (None, "auto"):
        raise ApiError(400, "'tool_choice' may be 'auto' or 'none' (forcing a call is not "
                       "supported yet)", "tool_choice")  # fmt: skip
    fmt = detect_format(getattr(tokenizer, "chat_template", None))
    if fmt is None:
        raise ApiError(400, "tool calls cannot be parsed for this model's chat template "
                       "(known formats: hermes, mistral, llama3_json)", "tools")  # fmt: skip
    if stream:
        raise ApiError(400, "streamed tool calls are not supported yet: use stream=false "
                       "with tools", "stream")  # fmt: skip
    return fmt


def parse_generate(body: Any, tokenizer: Any, limits: Limits) -> ParsedRequest:
    """The native ``/generate`` body: ``prompt_token_ids`` and an optional
    ``sampling_params`` object (completion fields; ``max_tokens`` 16 by default), always
    streamed."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    ids = body.get("prompt_token_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise ApiError(
            400, "'prompt_token_ids' must be a non-empty list of integers", "prompt_token_ids"
        )
    sp = body.get("sampling_params")
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise ApiError(400, "'sampling_params' must be an object", "sampling_params")
    as_completion = {"max_tokens": 16, **sp, "prompt": ids, "stream": True, "model": None}
    parsed = parse_completion(as_completion, tokenizer, limits)
    if parsed.n != 1:
        raise ApiError(400, "'sampling_params.n' must be 1 for /generate", "sampling_params")
    return parsed


def parse_tokenize(body: Any, tokenizer: Any, limits: Limits) -> dict[str, Any]:
    """vLLM's ``POST /tokenize``: ``{"prompt": str, "add_special_tokens": true}`` or
    ``{"messages": [...], "add_generation_prompt": true}`` (the chat template, as
    /v1/chat/completions applies it); ``return_token_strs`` adds each token's text. Answers
    ``{"count", "max_model_len", "tokens"[, "token_strs"]}``."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    _check_model(body, limits.served)
    known = {"model", "prompt", "messages", "tools", "add_special_tokens",
             "add_generation_prompt", "return_token_strs"}  # fmt: skip
    for key in body:
        if key not in known:
            raise ApiError(400, f"unrecognized request argument '{key}' for /tokenize", key)
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "give exactly one of 'prompt' or 'messages'", "prompt")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", "prompt")
        _check_length(len(prompt), limits, "the prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=_bool(body, "add_special_tokens", True))
    else:
        text = _chat_text(body, tokenizer, limits, _bool(body, "add_generation_prompt", True))
        ids = tokenizer.encode(text, add_special_tokens=_bool(body, "add_special_tokens", False))
    out: dict[str, Any] = {"count": len(ids), "max_model_len": limits.max_model_len,
                           "tokens": ids}  # fmt: skip
    if _bool(body, "return_token_strs", False):
        out["token_strs"] = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    return out


def parse_detokenize(body: Any, tokenizer: Any, limits: Limits) -> dict[str, Any]:
    """vLLM's ``POST /detokenize``: ``{"tokens": [ids]}`` → ``{"prompt": text}`` (special
    tokens kept, as vLLM does)."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    _check_model(body, limits.served)
    for key in body:
        if key not in ("model", "tokens"):
            raise ApiError(400, f"unrecognized request argument '{key}' for /detokenize", key)
    ids = _token_ids(body.get("tokens"), "tokens", limits.vocab_size, True)
    return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
