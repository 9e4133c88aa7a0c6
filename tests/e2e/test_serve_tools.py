"""Tool calling against a real `tandem serve` whose model has a Hermes-style chat template
(the tiny model's folder with only the template changed): tools and a tool-call round trip
in the history are rendered into the prompt, and the answer comes back through the openai
SDK. Parsing of calls in generated text is covered per format in
tests/unit/router/test_tools.py (random weights never write a call)."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from tests.e2e.servers import serve

TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    'Answer calls as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]  # fmt: skip


@pytest.fixture(scope="module")
def hermes_server(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(tiny_llama_dir, folder, symlinks=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with serve(folder, "--served-model-name", "tiny", timeout=120) as url:
        yield url


def _post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_tool_round_trip_is_rendered_and_answered(hermes_server):
    from openai import BadRequestError, OpenAI

    tokens = _post(hermes_server, "/tokenize", {"messages": HISTORY, "tools": TOOLS})["tokens"]
    prompt = _post(hermes_server, "/detokenize", {"tokens": tokens})["prompt"]
    assert '"name": "get_weather"' in prompt and "<tool_response>18 C, sunny" in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    client = OpenAI(base_url=hermes_server + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS,
                                       max_tokens=8, temperature=0)  # fmt: skip
    assert r.usage.prompt_tokens == len(tokens)
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    with pytest.raises(BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS,
                                       tool_choice="required", max_tokens=4)  # fmt: skip
    with pytest.raises(BadRequestError, match="stream"):
        client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS,
                                       stream=True, max_tokens=4)  # fmt: skip
