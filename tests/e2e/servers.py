"""Starting Tandem's CLI processes for end-to-end tests: free ports, spawn, wait for health."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_cli(args: Sequence[str], **kwargs) -> subprocess.Popen:
    """``python -m tandem.cli ARGS`` with quiet logs (the caller stops it)."""
    env = {**os.environ, "TANDEM_LOG_LEVEL": "WARNING", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "tandem.cli", *args], env=env, **kwargs)


def health(url: str) -> dict:
    """The router's /health body (also when it answers 503: it says what is missing)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return {}
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return {}


def wait_healthy(
    url: str, procs: Sequence[subprocess.Popen], timeout: float = 180.0, workers: int = 1
) -> None:
    deadline = time.time() + timeout
    while health(url).get("workers", 0) < workers:
        if time.time() > deadline:
            raise AssertionError(f"{url} did not become healthy in {timeout:g} s")
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a server process exited during start-up")
        time.sleep(0.3)


def stop(procs: Sequence[subprocess.Popen], timeout: float = 15.0) -> None:
    """Terminate, wait up to ``timeout`` seconds each, then kill."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


@contextlib.contextmanager
def serve(
    model_dir, *extra: str, timeout: float = 180.0, workers: int = 1, env: dict | None = None
) -> Iterator[str]:
    """``tandem serve --model MODEL_DIR EXTRA...`` on a free port; yields its URL once
    healthy with at least ``workers`` workers connected (fails after ``timeout`` seconds,
    or at once if the server exits). ``env``: extra environment variables. ``model_dir``
    None: no ``--model`` (the bundled model of ``TANDEM_CACHE_DIR``)."""
    port = free_port()
    model = [] if model_dir is None else ["--model", str(model_dir)]
    proc = spawn_cli(["serve", *model, "--port", str(port), *extra], env=env or {})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], timeout, workers)
        yield url
    finally:
        stop([proc])


def metrics(url: str) -> dict[str, float]:
    """The router's /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``: {pid: command line} (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid != pid or stat.rpartition(")")[2].split()[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
    return out


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
