"""The container healthcheck against a real Redis registry and a real worker process.

A worker is healthy once its entry is in the registry and the address it advertises accepts
connections; the id comes from the entrypoint (``tandem.container``), as in the images.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tandem import container

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


@pytest.fixture
def redis_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_fake_engine_worker_becomes_healthy_and_unhealthy_when_it_dies(tmp_path, redis_url):
    state = tmp_path / "state.json"
    env = {**os.environ, "TANDEM_STATE_FILE": str(state), "TANDEM_REGISTRY": redis_url}
    # --fake-engine: no model, no torch; the worker registers like any other (port 0 = free)
    role = ["decode-worker", "--fake-engine", "--quiet", "--ready-fd", "1"]  # handshake only
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.container", "run", *role],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("TANDEM_WORKER_READY"), line
        argv = json.loads(state.read_text())["argv"]
        deadline = time.monotonic() + 10
        ok, reason = container.check(argv)
        while not ok and time.monotonic() < deadline:
            time.sleep(0.1)
            ok, reason = container.check(argv)
        assert ok, reason
        worker_id = argv[argv.index("--worker-id") + 1]
        assert worker_id in reason and line.split()[-1] in reason  # the port it really bound
    finally:
        proc.kill()
        proc.wait(timeout=10)
    ok, reason = container.check(argv)  # still registered until its TTL, but not accepting
    assert not ok, reason
