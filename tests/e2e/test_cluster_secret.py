"""The cluster secret between real processes (tandem.auth): a router and a worker that share
it serve requests; a router without it, or with another one, is refused by the worker with a
logged reason and fails at start-up saying why; `tandem serve` hands its secret to its
workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e.servers import free_port, serve, stop
from tests.e2e.test_fake_engine import _wait_ready

SECRET = "cluster-secret-0123456789abcdef"
CLI = [sys.executable, "-m", "tandem.cli"]


@pytest.fixture(scope="module")
def worker(tiny_llama_dir):
    """A fake-engine colocated worker that wants the secret; its log is on stderr."""
    env = {**os.environ, "TANDEM_LOG_LEVEL": "INFO", "TANDEM_CLUSTER_SECRET": SECRET}
    proc = subprocess.Popen(
        [*CLI, "decode-worker", "--fake-engine", "--fake-step-ms", "2", "--model",
         str(tiny_llama_dir), "--kv-blocks", "256", "--ready-fd", "1", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )  # fmt: skip
    try:
        yield proc, _wait_ready(proc)
    finally:
        stop([proc], timeout=10)


def _router(model, address: str, secret: str | None):
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_CLUSTER_SECRET"}
    env["TANDEM_LOG_LEVEL"] = "WARNING"
    if secret is not None:
        env["TANDEM_CLUSTER_SECRET"] = secret
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "router", "--model", str(model), "--worker", address, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def _completion(url: str) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps({"prompt": "hi", "max_tokens": 3}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_router_with_the_secret_serves(worker, tiny_llama_dir):
    _, address = worker
    router, url = _router(tiny_llama_dir, address, SECRET)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if json.loads(r.read())["workers"] == 1:
                        break
            except OSError:
                pass
            assert router.poll() is None and time.monotonic() < deadline, "router not healthy"
            time.sleep(0.2)
        assert _completion(url)["usage"]["completion_tokens"] == 3
    finally:
        stop([router])


@pytest.mark.parametrize(
    ("secret", "router_says"),
    [(None, "requires the cluster secret"), ("another-secret-0123456789", "refused us")],
)
def test_router_without_or_with_a_wrong_secret_is_refused(worker, tiny_llama_dir, secret,
                                                          router_says):  # fmt: skip
    proc, address = worker
    router, _ = _router(tiny_llama_dir, address, secret)
    try:
        _, err = router.communicate(timeout=60)  # a static worker it cannot join: it exits
    finally:
        stop([router])
    assert router.returncode != 0
    text = err.decode(errors="replace")
    assert router_says in text, text[-2000:]
    assert SECRET not in text and (secret is None or secret not in text)


def test_worker_logs_why_it_refused(worker):
    proc, _ = worker
    os.set_blocking(proc.stderr.fileno(), False)
    text = (proc.stderr.read() or b"").decode(errors="replace")
    assert "refused" in text and "cluster secret" in text, text[-2000:]
    assert SECRET not in text


def test_serve_hands_its_secret_to_its_workers(tiny_llama_dir):
    with serve(tiny_llama_dir, env={"TANDEM_CLUSTER_SECRET": SECRET}, timeout=120) as url:
        assert _completion(url)["usage"]["completion_tokens"] == 3
