"""Hostile and unlucky input against a real `tandem serve` (issue #20): every case is a 4xx
in OpenAI's error JSON, nothing holds a slot afterwards, and nothing stalls the server."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.servers import free_port, serve, spawn_cli, stop


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    # 4 batch slots: a leak of 4 slots would leave every later request waiting forever.
    with serve(tiny_llama_dir, "--max-num-seqs", "4", "--header-timeout", "2",
               "--max-body-mb", "2", timeout=120) as url:  # fmt: skip
        yield url


def _post(url: str, path: str, body, timeout: float = 60.0) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _assert_openai_error(status: int, body: dict, want: int, param: str | None = None) -> None:
    assert status == want, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize(
    ("field", "value"), [("seed", 2**70), ("priority", 10**30), ("stop_token_ids", [2**70])]
)
def test_oversized_integers_are_400_and_hold_no_slot(server, field, value):
    for _ in range(6):  # more than the 4 slots: before the fix each one held one forever
        status, _, body = _post(server, "/v1/completions",
                                {"prompt": "hi", "max_tokens": 2, field: value})  # fmt: skip
        _assert_openai_error(status, body, 400, field)
    status, _, body = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, 30)
    assert status == 200 and body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [("/v1/completions", b"[" * 60000 + b"]" * 60000, None),
     ("/v1/completions", b'{"prompt": "hi \\ud800"}', "prompt"),
     ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
     ("/generate", b'{"prompt_token_ids": [1, 2], "sampling_params": [1]}', "sampling_params"),
     ("/generate", b'{"prompt_token_ids": [1, 2], "sampling_params": "x"}', "sampling_params"),
     ("/v1/completions", b'{"prompt": "hi", "ignore_eos": "x"}', "ignore_eos"),
     ("/v1/completions", b'{"prompt": ""}', "prompt"),
     ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": []}]}', "messages"),
     ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
      "messages")],
)  # fmt: skip
def test_malformed_bodies_are_400_json(server, path, raw, param):
    status, headers, body = _post(server, path, raw)
    _assert_openai_error(status, body, 400, param)
    assert headers["Content-Type"].startswith("application/json")


def test_404_405_413_are_openai_json(server):
    try:
        urllib.request.urlopen(server + "/v2/nothing", timeout=10)
    except urllib.error.HTTPError as e:
        _assert_openai_error(e.code, json.loads(e.read()), 404)
    req = urllib.request.Request(server + "/v1/completions", method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as e:
        _assert_openai_error(e.code, json.loads(e.read()), 405)
    status, _, body = _post(server, "/v1/completions", b'{"prompt": "' + b"a" * 3 * 2**20 + b'"}')
    _assert_openai_error(status, body, 413)


def test_tiny_temperature_is_greedy(server):
    outs = []
    for temperature in (0, 1e-300):
        status, _, body = _post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 8,
                                "temperature": temperature, "logprobs": 1})  # fmt: skip
        assert status == 200
        outs.append(body["choices"][0])
    assert outs[0]["text"] == outs[1]["text"]
    assert min(outs[1]["logprobs"]["token_logprobs"]) > -30  # no overflowed -72 draws


def test_sse_content_type_names_utf8(server):
    req = urllib.request.Request(server + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "hi", "max_tokens": 2, "stream": True}).encode())  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert r.read().endswith(b"data: [DONE]\n\n")


def test_huge_prompt_does_not_stall_health(server):
    """A prompt far past the context is refused by its length before tokenizing; one near the
    bound is tokenized off the event loop: /health keeps answering meanwhile."""
    results: list[tuple[int, dict]] = []

    def big(chars: int) -> None:
        words = " ".join(f"w{i % 9973}" for i in range(chars // 6))
        status, _, body = _post(server, "/v1/completions", {"prompt": words, "max_tokens": 1})
        results.append((status, body))

    threads = [threading.Thread(target=big, args=(n,)) for n in (1_900_000, 250_000)]
    for t in threads:
        t.start()
    health_ok = 0
    while any(t.is_alive() for t in threads):
        with urllib.request.urlopen(server + "/health", timeout=5) as r:
            health_ok += r.status == 200
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert health_ok >= 1
    assert [s for s, _ in results] == [400, 400], results
    by_length = [b["error"]["message"] for _, b in results]
    assert sum("characters" in m for m in by_length) == 1, by_length  # refused untokenized
    assert sum("context length" in m for m in by_length) == 1, by_length  # tokenized, too long


def test_half_sent_headers_are_closed(server):
    host, port = server.removeprefix("http://").split(":")
    socks = []
    for _ in range(50):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Len")
        socks.append(s)
    # The server still serves while they hang.
    status, _, _ = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200
    deadline = time.monotonic() + 20  # header timeout 2 s; generous for a loaded CI box
    open_ = set(socks)
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_), [], [], 0.5)
        for s in ready:
            if s.recv(4096) == b"":
                open_.discard(s)
    for s in socks:
        s.close()
    assert not open_, f"{len(open_)} of 50 half-open connections still open"


def test_health_is_503_without_a_prefill_worker(tiny_llama_dir):
    """A decode worker alone cannot serve: /health says what is missing, requests get 503."""
    decode_port, http_port = free_port(), free_port()
    decode = spawn_cli(
        ["decode-worker", "--model", str(tiny_llama_dir), "--port", str(decode_port)]
    )
    router = spawn_cli(["router", "--model", str(tiny_llama_dir), "--port", str(http_port),
                        "--worker", f"127.0.0.1:{decode_port}"])  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    pytest.fail(f"/health answered {r.status} with only a decode worker")
            except urllib.error.HTTPError as e:
                body = json.loads(e.read())
                if body.get("workers") == 1:
                    assert e.code == 503 and "prefill" in body["reason"]
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert decode.poll() is None and router.poll() is None
            assert time.monotonic() < deadline, "the decode worker never connected"
            time.sleep(0.3)
        with urllib.request.urlopen(url + "/health/live", timeout=2) as r:
            assert r.status == 200
        status, _, body = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        _assert_openai_error(status, body, 503)
        assert "prefill" in body["error"]["message"]
    finally:
        stop([router, decode])
