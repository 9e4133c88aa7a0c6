"""Tool calling (pure): checking ``tools`` and tool messages, and finding tool calls in
generated text.

Requests: ``tools`` is a list of ``{"type": "function", "function": {"name", "description"?,
"parameters"?}}``; the history may hold assistant messages with ``tool_calls`` (their
``arguments`` JSON strings are parsed to objects, as chat templates expect) and ``tool``
messages answering them. All of it is rendered by the model's chat template, which must
mention ``tools`` / ``tool_calls`` itself: a template that does not is refused (400), never
silently given a prompt without the tools.

Responses: the model's text is searched for calls in the format its chat template teaches
(``detect_format``): Hermes / Qwen ``<tool_call>{json}</tool_call>``, Mistral
``[TOOL_CALLS] [{json}, ...]`` and Llama 3.x JSON (``{"name", "parameters"}``, optionally
after ``<|python_tag|>``). Text that does not parse as a call stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

FORMATS = ("hermes", "mistral", "llama3_json")


class ToolError(ValueError):
    """A malformed tools list or tool message (the message names where)."""


def check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of function tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"tools[{i}].function.name must be a non-empty string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


def check_tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, with ``arguments`` parsed to objects."""
    if not isinstance(calls, list) or not calls:
        raise ToolError(f"messages[{i}].tool_calls must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError(f"{where} needs a function with a 'name'")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise ToolError(f"{where}.function.arguments is not valid JSON") from None
        if not isinstance(args, dict):
            raise ToolError(f"{where}.function.arguments must be a JSON object")
        out.append({"id": call.get("id") or f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})  # fmt: skip
    return out


def detect_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or None if it shows none."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None


def _call(obj: Any) -> dict[str, Any] | None:
    """An OpenAI tool call from ``{"name", "arguments" | "parameters"}``, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}  # fmt: skip


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) found in ``text`` for ``fmt``. Content is the text outside
    the calls (None when nothing is left); with no valid call the text is all content."""
    calls: list[dict[str, Any]] = []
    rest = text
    if fmt == "hermes":
        for m in _HERMES.finditer(text):
            try:
                call = _call(json.loads(m.group(1)))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        rest = _HERMES.sub("", text)
    elif fmt == "mistral":
        if "[TOOL_CALLS]" not in text:
            return text, []
        rest, _, payload = text.partition("[TOOL_CALLS]")
        try:
            items = json.loads(payload.strip())
        except json.JSONDecodeError:
            return text, []
        items = items if isinstance(items, list) else [items]
        calls = [c for c in map(_call, items) if c is not None]
        if len(calls) != len(items):
            return text, []
    elif fmt == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        at = 0
        while at < len(body):  # one call, or several separated by ';'
            try:
                obj, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj)
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \n\t;":
                at += 1
        rest = ""
    else:
        raise ValueError(f"unknown tool-call format {fmt!r} (one of {', '.join(FORMATS)})")
    rest = rest.strip()
    return (rest or None), calls


def chat_message(
    text: str, finish: str | None, fmt: str | None, parallel: bool = True
) -> tuple[dict[str, Any], str | None]:
    """The assistant message and finish reason of a non-streamed chat choice: with a
    format, calls found in ``text`` become ``tool_calls`` (only the first unless
    ``parallel``) and a choice that stopped on its own finishes with ``"tool_calls"``."""
    if fmt is None:
        return {"role": "assistant", "content": text}, finish
    content, calls = parse_tool_calls(text, fmt)
    calls = calls if parallel else calls[:1]
    if not calls:
        return {"role": "assistant", "content": text}, finish
    return (
        {"role": "assistant", "content": content, "tool_calls": calls},
        "tool_calls" if finish == "stop" else finish,
    )
