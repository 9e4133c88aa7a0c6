"""Keys and limits on a real `tandem serve` (issue #18), driven by the openai SDK and raw
HTTP: 401 without a key, 403 for admin beyond loopback, 429 past the per-key limit, 400
naming the field past each input limit, and no key in anything the server prints."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.e2e.servers import free_port, redis_server, spawn_cli, stop, wait_healthy

FLAG_KEY, ENV_KEY, ADMIN, METRICS = "sk-flag-0123", "sk-env-4567", "adm-89ab", "met-cdef"
KEYS = (FLAG_KEY, ENV_KEY, ADMIN, METRICS)


class Output:
    """Everything a process writes to stdout and stderr, collected by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    port = free_port()
    proc = spawn_cli(
        ["serve", "--model", str(tiny_llama_dir), "--port", str(port), "--served-model-name",
         "tiny", "--api-key", FLAG_KEY, "--admin-key", ADMIN, "--metrics-key", METRICS,
         "--max-concurrent-per-key", "1", "--max-tokens-limit", "3000",
         "--max-prompt-tokens", "100", "--access-log"],
        env={"TANDEM_API_KEY": ENV_KEY, "TANDEM_LOG_LEVEL": "INFO"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out = Output(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], 120)
        yield url, out
    finally:
        stop([proc])


def _request(url: str, path: str, key: str | None = None, body=None, method: str | None = None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _client(url: str, key: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_openai_sdk_without_a_valid_key_gets_authentication_error(server):
    import openai

    url, _ = server
    with pytest.raises(openai.AuthenticationError) as info:
        _client(url, "sk-wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    status, headers, body = _request(url, "/v1/chat/completions", None,
                                     {"messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("key", [FLAG_KEY, ENV_KEY])
def test_flag_and_environment_keys_both_work(server, key):
    url, _ = server
    out = _client(url, key).completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert out.usage.completion_tokens == 3
    assert _client(url, key).models.list().data[0].id == "tiny"
    status, _, _ = _request(url, "/generate", key, {"prompt_token_ids": [1, 2, 3]})
    assert status == 200


def test_health_and_openapi_are_open_metrics_and_admin_need_their_keys(server):
    url, _ = server
    assert _request(url, "/health")[0] == 200
    status, _, body = _request(url, "/openapi.json")
    assert status == 200 and "/v1/completions" in json.loads(body)["paths"]
    assert _request(url, "/metrics")[0] == 401
    assert _request(url, "/metrics", FLAG_KEY)[0] == 401
    assert _request(url, "/metrics", METRICS)[0] == 200
    assert _request(url, "/admin/workers")[0] == 401
    assert _request(url, "/admin/workers", FLAG_KEY)[0] == 401  # an API key is not an admin key
    assert _request(url, "/admin/workers", ADMIN)[0] == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [("/v1/completions", {"prompt": "hi", "max_tokens": 3001}, "max_tokens"),
     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                               "max_completion_tokens": 3001}, "max_completion_tokens"),
     ("/v1/completions", {"prompt": list(range(1, 102)), "max_tokens": 1}, "prompt"),
     ("/generate", {"prompt_token_ids": list(range(1, 102))}, "prompt"),
     ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 17}, "stop"),
     ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                               "logprobs": True, "top_logprobs": 21}, "top_logprobs")],
)  # fmt: skip
def test_each_input_limit_is_400_naming_its_field(server, path, body, param):
    url, _ = server
    status, _, raw = _request(url, path, FLAG_KEY, body)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == param, error


def test_per_key_concurrency_limit_is_429_while_a_stream_holds_the_slot(server):
    import http.client

    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {FLAG_KEY}"})  # fmt: skip
    stream = conn.getresponse()
    assert stream.status == 200
    stream.readline()  # the stream is running: FLAG_KEY's only slot is taken
    try:
        status, headers, raw = _request(url, "/v1/completions", FLAG_KEY, {"prompt": "hi"})
        assert status == 429 and headers["Retry-After"] == "1"
        assert "API key" in json.loads(raw)["error"]["message"]
        assert (
            _request(url, "/v1/completions", ENV_KEY, {"prompt": "hi", "max_tokens": 2})[0] == 200
        )
    finally:
        conn.close()  # the client goes away: the request is aborted and its slot freed
    for _ in range(100):
        status = _request(url, "/v1/completions", FLAG_KEY, {"prompt": "hi", "max_tokens": 2})[0]
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200


def test_no_key_in_anything_the_server_printed(server):
    url, out = server
    _request(url, "/v1/completions", FLAG_KEY, {"prompt": "hi", "max_tokens": 1})
    _request(url, "/v1/completions", "sk-bogus-key", {"prompt": "hi"})
    text = out.text
    assert "auth" in text and "2 API key(s)" in text, text  # the start-up summary's auth line
    assert "/v1/completions" in text  # the access log is on
    for key in (*KEYS, "sk-bogus-key"):
        assert key not in text


def test_admin_beyond_loopback_without_admin_key_is_403(tiny_llama_dir):
    with redis_server() as registry:
        port = free_port()
        proc = spawn_cli(["router", "--model", str(tiny_llama_dir), "--host", "0.0.0.0",
                          "--port", str(port), "--registry", registry, "--api-key", FLAG_KEY],
                         stdout=subprocess.DEVNULL)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:  # /health answers (503: no worker) once the router is up
                try:
                    if _request(url, "/health")[0] == 503:
                        break
                except urllib.error.URLError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "router did not start"
                time.sleep(0.2)
            status, _, raw = _request(url, "/admin/workers", FLAG_KEY)
            assert status == 403 and "--admin-key" in json.loads(raw)["error"]["message"]
            assert _request(url, "/admin/drain/x", FLAG_KEY, {}, "POST")[0] == 403
            assert _request(url, "/v1/completions", None, {"prompt": "hi"})[0] == 401
        finally:
            stop([proc])
