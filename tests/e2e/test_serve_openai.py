"""`tandem serve` as real processes on loopback, driven by real HTTP clients.

The router and a colocated worker are started by the CLI exactly as a user starts them;
the openai SDK must get the same greedy text as the offline ``LLM`` API.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

import pytest

from tandem import LLM, SamplingParams
from tests.e2e.servers import serve


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with serve(tiny_llama_dir, "--max-num-batched-tokens", "256", "--served-model-name", "tiny",
               timeout=120) as url:  # fmt: skip
        yield url


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    return LLM(model=tiny_llama_dir, max_num_batched_tokens=256)


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


PROMPTS = ["Hello, Tandem!", "Café au lait and 日本語 🙂", "The quick brown fox"]


def test_completions_match_offline_api(server, offline):
    client = _client(server)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    expected = [o.text for o in offline.generate(PROMPTS, greedy)]
    for prompt, want in zip(PROMPTS, expected, strict=True):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == want


def test_chat_matches_offline_api(server, offline):
    client = _client(server)
    tok = offline.get_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me a story"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    want = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=12))[0].text
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0
    )
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_stop_string_and_logprobs(server, offline):
    client = _client(server)
    base = (
        client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0
        )
        .choices[0]
        .text
    )
    stop = base[10:13]
    first = base.find(stop)
    r = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == base[:first] and r.choices[0].finish_reason == "stop"
    lp = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=4, temperature=0, logprobs=2
    )
    assert len(lp.choices[0].logprobs.token_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.choices[0].logprobs.top_logprobs)


def _post(url, path, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**7}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            400,
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            },
            400,
            "tools",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            400,
            "tool_choice",
        ),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": 3},
            400,
            "logprobs",
        ),
        ("/generate", {"prompt_token_ids": "abc"}, 400, "prompt_token_ids"),
        ("/admin/migrate", {"request_id": "cmpl-x"}, 409, None),  # --migration off
        ("/admin/drain/127.0.0.1:1", {}, 409, None),
    ],
)
def test_bad_input_gets_a_clear_4xx(server, path, body, status, param):
    got, payload = _post(server, path, body, raw=isinstance(body, bytes))
    assert got == status, payload
    assert payload["error"]["message"]
    if param is not None:
        assert payload["error"]["param"] == param


def test_generate_streams_token_ids(server, offline):
    ids = [5, 6, 7, 8]
    want = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=6))[0].token_ids
    req = urllib.request.Request(
        server + "/generate",
        data=json.dumps(
            {"prompt_token_ids": ids, "sampling_params": {"max_tokens": 6, "temperature": 0}}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    got = []
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: {"):
                got += json.loads(line[6:])["token_ids"]
    assert got == want


def _metric(text: str, name: str) -> float:
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)]
    return sum(values)


def test_dropped_streams_free_every_block(server):
    import aiohttp

    async def drop_one(session, i):
        body = {"prompt": f"request {i}", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with session.post(server + "/v1/completions", json=body) as r:
            assert r.status == 200
            seen = 0
            async for line in r.content:
                if line.startswith(b"data: {"):
                    seen += 1
                    if seen >= 3:
                        return  # leave mid-stream: the connection closes here

    async def main():
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(drop_one(session, i) for i in range(50)))

    asyncio.run(main())
    deadline = time.time() + 20
    while time.time() < deadline:
        with urllib.request.urlopen(server + "/metrics", timeout=5) as r:
            text = r.read().decode()
        if (
            _metric(text, "tandem_worker_kv_blocks_used") == 0
            and _metric(text, "tandem_worker_running_requests") == 0
        ):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"blocks still used after the clients left:\n{text}")
    assert 'tandem_requests_total{outcome="abort"}' in text


def _wait_metric(url: str, name: str, at_least: float, timeout: float = 20.0) -> float:
    from tests.e2e.servers import metrics

    deadline = time.time() + timeout
    while True:
        total = sum(v for k, v in metrics(url).items() if k.startswith(name + "{"))
        if total >= at_least or time.time() > deadline:
            return total
        time.sleep(0.3)


def test_n_choices_share_the_prompt_blocks(server):
    """n=4: four indexed choices; choices 1-3 reuse choice 0's 6 cached full prompt blocks
    (visible as prefix hit tokens in /metrics); usage sums completion tokens; choice i is
    the same as one request seeded with seed + i."""
    client = _client(server)
    prompt = [(53 * i) % 1500 + 20 for i in range(100)]  # 6 full blocks of 16 + 4 tokens
    hits = "tandem_worker_prefix_cache_hit_tokens_total"
    before = _wait_metric(server, hits, 0)
    r = client.completions.create(
        model="tiny", prompt=prompt, n=4, max_tokens=8, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 100 and r.usage.completion_tokens == 32
    assert _wait_metric(server, hits, before + 3 * 96) - before == 3 * 96
    by_index = {c.index: c.text for c in r.choices}
    for i in (0, 3):
        one = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=7 + i
        )
        assert one.choices[0].text == by_index[i]
    assert len(set(by_index.values())) > 1  # different seeds, different samples


def test_n_choices_streamed_chat_match_non_streamed(server):
    client = _client(server)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], n=3,
              max_tokens=10, temperature=0.8, seed=11)  # fmt: skip
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 30


def test_logit_bias_changes_the_greedy_token(server, offline):
    client = _client(server)
    tok = offline.get_tokenizer()
    x = tok.encode(" fox", add_special_tokens=False)[-1]
    kw = dict(model="tiny", prompt="Hello, Tandem!", max_tokens=3, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    biased = client.completions.create(**kw, logit_bias={str(x): 100}).choices[0].text
    assert biased == tok.decode([x, x, x]) != plain
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0,
        logit_bias={str(x): 100},
    )  # fmt: skip
    assert chat.choices[0].message.content == tok.decode([x, x])
    status, body = _post(server, "/v1/completions", {"prompt": "x", "logit_bias": {"5": 300}})
    assert status == 400 and body["error"]["param"] == "logit_bias"


def test_echo_prepends_the_prompt(server):
    client = _client(server)
    kw = dict(model="tiny", prompt="Hello, Tandem!", max_tokens=5, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(**kw, echo=True, n=2)
    assert [c.text for c in echoed.choices] == ["Hello, Tandem!" + plain] * 2
    stream = client.completions.create(**kw, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Hello, Tandem!" + plain
    status, body = _post(server, "/v1/completions", {**kw, "echo": True, "logprobs": 1})
    assert status == 400 and body["error"]["param"] == "echo"


def test_model_card_tokenize_and_detokenize(server, offline):
    client = _client(server)
    assert client.models.retrieve("tiny").id == "tiny"
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-9")
    try:
        urllib.request.urlopen(server + "/v1/models/gpt-9", timeout=5)
        raise AssertionError("an unknown model must be a 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404 and json.loads(e.read())["error"]["param"] == "model"
    tok = offline.get_tokenizer()
    text = "Café au lait and 日本語 🙂"
    status, out = _post(server, "/tokenize", {"model": "tiny", "prompt": text})
    assert status == 200 and out["tokens"] == tok(text).input_ids
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
    status, back = _post(server, "/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and back["prompt"] == tok.decode(out["tokens"])
    messages = [{"role": "user", "content": "Tell me a story"}]
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    status, out = _post(server, "/tokenize", {"messages": messages})
    assert out["tokens"] == tok(chat_text, add_special_tokens=False).input_ids
    assert _post(server, "/tokenize", {"prompt": 5})[0] == 400
    assert _post(server, "/detokenize", {"tokens": [10**9]})[0] == 400
