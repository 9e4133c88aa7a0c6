"""`tandem serve` as a supervisor sees it: a worker that cannot start stops the server."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.servers import free_port


def test_serve_exits_with_an_error_when_its_worker_cannot_start(tiny_llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "serve", "--model", str(tiny_llama_dir),
         "--port", str(free_port()), "--kv-blocks", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "KV cache too small" in proc.stderr  # the worker's own reason
    assert "every decode-worker process exited" in proc.stderr
    assert "Traceback" not in proc.stderr
