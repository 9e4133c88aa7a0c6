"""`tandem serve` supervises its worker: a worker killed with SIGKILL is restarted with
backoff (or, with --no-restart-workers, left dead and serve exits), and while it is gone the
router's /metrics shows it down instead of its last blocks and running requests.

The start-up summary and the access log are checked on the same server (one start-up each
costs seconds on a shared CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

from tests.e2e.servers import children, free_port, metrics, spawn_cli, stop, wait_healthy


def _worker_pid(serve_pid: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p, cmd in children(serve_pid).items() if "decode-worker" in cmd]
        if pids:
            assert len(pids) == 1, pids
            return pids[0]
        time.sleep(0.2)
    raise AssertionError("no worker process under tandem serve")


def _complete(url: str, **body) -> dict:
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, **body}
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "supervision-test"},
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def _series(url: str, name: str) -> dict[str, float]:
    """{worker address: value} of one per-worker metric."""
    out = {}
    for key, value in metrics(url).items():
        if key.startswith(name + "{"):
            out[key.split('worker="')[1].split('"')[0]] = value
    return out


def _start(tmp_path: Path, model_dir: Path, *flags: str):
    port = free_port()
    out, err = (tmp_path / "serve.out").open("w"), (tmp_path / "serve.err").open("w")
    proc = spawn_cli(
        ["serve", "--model", str(model_dir), "--port", str(port), "--kv-blocks", "256", *flags],
        stdout=out,
        stderr=err,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, [proc], timeout=180)
    return proc, url, port


def test_a_killed_worker_is_restarted_and_its_stale_gauges_dropped(tiny_llama_dir, tmp_path):
    proc, url, port = _start(tmp_path, tiny_llama_dir, "--access-log")
    try:
        old = _worker_pid(proc.pid)
        out = (tmp_path / "serve.out").read_text()
        # The start-up summary, not the worker's internal handshake, is what users see.
        assert f"tandem serve: '{tiny_llama_dir.name}' at http://127.0.0.1:{port}" in out
        for text in ("vocab 2048, max_model_len 4096", "policy mlfq", "256 seqs and 2048 tokens",
                     "colocated", f"pid {old}", "cpu float32",
                     "KV 256 blocks x 16 tokens = 4096 tokens", "4096 requests in flight",
                     "one that dies is restarted with backoff", "access log stdout"):  # fmt: skip
            assert text in out, (text, out)
        assert "TANDEM_WORKER_READY" not in out + (tmp_path / "serve.err").read_text()

        assert _complete(url)["choices"][0]["finish_reason"] == "length"
        # A long request keeps the worker busy, so its gauges say "running 1" when it dies.
        long = threading.Thread(
            target=lambda: _try(lambda: _complete(url, max_tokens=4000, ignore_eos=True)),
            daemon=True,
        )
        long.start()
        deadline = time.monotonic() + 60
        while not any(_series(url, "tandem_worker_running_requests").values()):
            assert time.monotonic() < deadline, "the long request never showed as running"
            time.sleep(0.2)
        (address,) = _series(url, "tandem_worker_running_requests")
        assert _series(url, "tandem_worker_kv_blocks_used")[address] > 0
        assert _series(url, "tandem_worker_up") == {address: 1}

        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _series(url, "tandem_worker_up").get(address) != 0:
            assert time.monotonic() < deadline, "the router still reports the dead worker up"
            time.sleep(0.05)
        down = metrics(url)
        stale = [k for k in down if f'worker="{address}"' in k and "tandem_worker_up" not in k]
        assert stale == [], stale  # before the fix: running 1, blocks used, forever
        long.join(timeout=30)

        wait_healthy(url, [proc], timeout=180)  # restarted on the same port, reconnected
        new = _worker_pid(proc.pid)
        assert new != old
        assert _complete(url)["choices"][0]["finish_reason"] == "length"
        deadline = time.monotonic() + 10
        while _series(url, "tandem_worker_up") != {address: 1}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        err = (tmp_path / "serve.err").read_text()
        assert (
            f"colocated worker {address} (pid {old}) exited: killed by signal 9 (SIGKILL); "
            "restarting it in 1.0 s" in err
        ), err
        assert f"restarting colocated worker {address} as pid {new} (restart 1)" in err, err
        out = (tmp_path / "serve.out").read_text()
        assert '"POST /v1/completions HTTP/1.1" 200' in out and "supervision-test" in out, out
    finally:
        stop([proc])
    assert proc.returncode == 0  # SIGTERM: a clean stop, its workers stopped and reaped
    for pid in (old, new):
        assert not Path(f"/proc/{pid}").exists()


def test_with_no_restart_workers_a_killed_worker_stays_dead(tiny_llama_dir, tmp_path):
    proc, url, _ = _start(tmp_path, tiny_llama_dir, "--no-restart-workers")
    try:
        old = _worker_pid(proc.pid)
        assert "one that dies stays dead" in (tmp_path / "serve.out").read_text()
        os.kill(old, signal.SIGKILL)
        # Its only worker is gone and nothing restarts it: serve exits for its supervisor.
        assert proc.wait(timeout=60) == 1
    finally:
        stop([proc])
    err = (tmp_path / "serve.err").read_text()
    assert "killed by signal 9 (SIGKILL); not restarting it (--no-restart-workers)" in err, err
    assert "every decode-worker process exited (killed by signal 9 (SIGKILL))" in err, err
    assert "restarting it in" not in err and "restarting colocated" not in err, err
    assert "Traceback" not in err, err
    # No access log unless asked for.
    assert "HTTP/1.1" not in (tmp_path / "serve.out").read_text()


def _try(fn) -> None:
    with contextlib.suppress(Exception):  # the request dies with its worker: the point
        fn()
