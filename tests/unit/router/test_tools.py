"""Tool calling (pure): tools and tool messages checked and handed to the chat template,
and calls found in generated text for each supported format."""

from __future__ import annotations

import json

import pytest

from router.openai_api import ApiError, Limits, parse_chat
from router.tools import chat_message, detect_format, parse_tool_calls

LIMITS = Limits("tiny", max_model_len=4096, vocab_size=100, max_token_chars=4)
TOOLS = [{"type": "function", "function": {"name": "get_weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
HERMES = "{% for m in messages %}{{ m.role }}{% if m.tool_calls %}<tool_call>{% endif %}{% endfor %}{{ tools }}"


class TemplateTokenizer:
    """Records what the template was given."""

    def __init__(self, template: str = HERMES) -> None:
        self.chat_template = template
        self.seen: dict = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + len(w) % 50 for w in text.split()] or [1]

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> str:
        self.seen = {"messages": messages, "tools": tools}
        return json.dumps(messages) + json.dumps(tools)


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]  # fmt: skip


def test_tool_history_and_tools_reach_the_template():
    tok = TemplateTokenizer()
    p = parse_chat({"messages": HISTORY, "tools": TOOLS}, tok, LIMITS)
    assert p.tool_format == "hermes"
    assistant, tool = tok.seen["messages"][1:]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert assistant["content"] == ""
    assert tool == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}
    assert tok.seen["tools"] == TOOLS
    assert parse_chat({"messages": HISTORY, "tools": TOOLS, "tool_choice": "none"}, tok,
                      LIMITS).tool_format is None  # fmt: skip


def _refused(body, tok=None) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat(body, tok or TemplateTokenizer(), LIMITS)
    assert info.value.status == 400
    return info.value


def test_bad_tools_and_tool_messages_are_400():
    user = [{"role": "user", "content": "hi"}]
    assert _refused({"messages": user, "tools": [{"type": "code"}]}).param == "tools"
    assert _refused({"messages": user, "tools": "x"}).param == "tools"
    assert _refused({"messages": user, "tools": TOOLS, "tool_choice": "required"}).param == (
        "tool_choice"
    )
    assert _refused({"messages": user, "tools": TOOLS, "stream": True}).param == "stream"
    bad_args = [HISTORY[0], {**HISTORY[1], "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]  # fmt: skip
    assert "arguments" in _refused({"messages": bad_args}).message
    plain = TemplateTokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")
    e = _refused({"messages": user, "tools": TOOLS}, plain)
    assert e.param == "tools" and "does not render tools" in e.message
    assert "tool_calls" in _refused({"messages": HISTORY[:2]}, plain).message
    assert "tool messages" in _refused({"messages": [HISTORY[2]]}, plain).message
    unknown = TemplateTokenizer("{{ tools }}{% for m in messages %}{{ m.tool_calls }}{% endfor %}")
    assert "cannot be parsed" in _refused({"messages": user, "tools": TOOLS}, unknown).message


def test_detect_format():
    assert detect_format("...<tool_call>...") == "hermes"
    assert detect_format("[TOOL_CALLS]") == "mistral"
    assert detect_format("<|start_header_id|>ipython<|end_header_id|>") == "llama3_json"
    assert detect_format("{{ messages }}") is None and detect_format(None) is None


@pytest.mark.parametrize(
    ("fmt", "text", "content"),
    [
        ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Let me check."),
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
        ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
    ],
)  # fmt: skip
def test_each_format_parses_a_call(fmt, text, content):
    got_content, calls = parse_tool_calls(text, fmt)
    assert got_content == content and len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_several_calls_and_text_that_is_not_a_call():
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    assert [c["function"]["name"] for c in parse_tool_calls(two, "hermes")[1]] == ["a", "b"]
    two = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}'
    assert len(parse_tool_calls(two, "llama3_json")[1]) == 2
    for fmt, text in [("hermes", "no call here"), ("hermes", "<tool_call>{broken</tool_call>"),
                      ("mistral", "[TOOL_CALLS] nope"), ("llama3_json", "{not json"),
                      ("llama3_json", '{"no_name": 1}'), ("mistral", "plain")]:  # fmt: skip
        assert parse_tool_calls(text, fmt) == (text, [])


def test_chat_message_sets_tool_calls_and_finish_reason():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
    message, finish = chat_message(text, "stop", "hermes")
    assert message["content"] is None and len(message["tool_calls"]) == 1 and finish == "tool_calls"
    assert chat_message(text, "length", "hermes")[1] == "length"
    assert chat_message("hi", "stop", "hermes") == ({"role": "assistant", "content": "hi"}, "stop")
    assert chat_message(text, "stop", None) == ({"role": "assistant", "content": text}, "stop")


def test_parallel_tool_calls_false_keeps_the_first_call():
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert len(chat_message(two, "stop", "hermes")[0]["tool_calls"]) == 2
    assert len(chat_message(two, "stop", "hermes", parallel=False)[0]["tool_calls"]) == 1
    body = {"messages": HISTORY, "tools": TOOLS, "parallel_tool_calls": False}
    assert parse_chat(body, TemplateTokenizer(), LIMITS).parallel_tool_calls is False
    assert _refused({**body, "parallel_tool_calls": "no"}).param == "parallel_tool_calls"
