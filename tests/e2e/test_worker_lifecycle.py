"""A standalone worker as an operator runs it: a start-up summary on stdout (its internal
ready handshake only on request, with --ready-fd), and on SIGTERM it leaves the Redis
registry at once instead of lingering there until its TTL runs out."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from tests.e2e.servers import redis_server, spawn_cli, stop

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def _read_until(proc: subprocess.Popen, needle: str, timeout: float = 60.0) -> str:
    """stdout lines up to and including the first that contains ``needle``."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the worker exited before printing {needle!r}: {lines}")
        lines.append(line)
        if needle in line:
            return "".join(lines)
    raise AssertionError(f"no {needle!r} in {timeout:g} s: {lines}")


def test_worker_prints_a_summary_and_deregisters_on_sigterm(tiny_llama_dir):
    import redis

    with redis_server() as url:
        client = redis.Redis.from_url(url)
        key = b"tandem:worker:decode-lifecycle"
        proc = spawn_cli(
            ["decode-worker", "--fake-engine", "--model", str(tiny_llama_dir), "--kv-blocks",
             "64", "--registry", url, "--worker-id", "decode-lifecycle", "--registry-ttl", "60",
             "--ready-fd", "1"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            out = _read_until(proc, "TANDEM_WORKER_READY")
            summary, handshake = out.rsplit("\n", 2)[0], out.splitlines()[-1]
            assert summary.startswith(
                "tandem decode-worker: colocated worker listening on 127.0.0.1:"
            )
            address = handshake.split()[1]
            for text in (f"listening on {address}", f"{tiny_llama_dir} (vocab 2048",
                         "KV 64 blocks x 16 tokens = 1024 tokens", "policy mlfq",
                         f"registered in {url} as decode-lifecycle (TTL 60 s)"):  # fmt: skip
                assert text in summary, (text, summary)
            assert client.exists(key)
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            while client.exists(key):
                assert time.monotonic() - start < 1.0, "still registered 1 s after SIGTERM"
                time.sleep(0.02)
            assert proc.wait(timeout=10) == 0
        finally:
            stop([proc])


def test_without_ready_fd_no_handshake_reaches_stdout(tiny_llama_dir):
    proc = spawn_cli(
        ["decode-worker", "--fake-engine", "--model", str(tiny_llama_dir), "--kv-blocks", "64"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out = _read_until(proc, "registry")  # the summary's last line
        assert "TANDEM_WORKER_READY" not in out
        assert "not in a registry: give the router --worker 127.0.0.1:" in out
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        stop([proc])


def test_a_bad_ready_fd_is_a_flag_error(tiny_llama_dir):
    proc = spawn_cli(
        ["decode-worker", "--fake-engine", "--model", str(tiny_llama_dir), "--ready-fd", "97"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--ready-fd 97 is not an open file descriptor" in err


def test_router_prints_its_summary_and_writes_an_access_log_file(tiny_llama_dir, tmp_path):
    import json
    import urllib.request

    from tests.e2e.servers import free_port, wait_healthy

    worker = spawn_cli(
        ["decode-worker", "--fake-engine", "--model", str(tiny_llama_dir), "--kv-blocks", "64",
         "--quiet", "--ready-fd", "1"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs = [worker]
    try:
        address = _read_until(worker, "TANDEM_WORKER_READY").split()[-1]
        port, log = free_port(), tmp_path / "access.log"
        router = spawn_cli(
            ["router", "--model", str(tiny_llama_dir), "--worker", address, "--port", str(port),
             "--access-log", str(log)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(router)
        out = _read_until(router, "access log")
        assert f"tandem router: '{tiny_llama_dir.name}' at http://127.0.0.1:{port}" in out
        assert f"colocated  {address}  cpu float32, KV 64 blocks x 16 tokens" in out, out
        assert f"access log {log}" in out
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, [router])
        body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        request = urllib.request.Request(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200
        deadline = time.monotonic() + 5
        while '"POST /v1/completions HTTP/1.1" 200' not in (
            log.read_text() if log.exists() else ""
        ):
            assert time.monotonic() < deadline, "no access-log line for the completion"
            time.sleep(0.05)
    finally:
        stop(procs)
