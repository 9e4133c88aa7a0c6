"""The README's fenced code snippets, extracted and run as a user would run them.

A snippet is a fenced block (```bash, ```python). The line just before the fence may be an
HTML comment (invisible on GitHub) that says how the test treats it:

- none: run it to the end; it must exit 0. bash runs with ``set -euo pipefail`` and a
  ``curl`` that fails on an HTTP error (``--fail-with-body``), so a 4xx/5xx breaks it.
- ``<!-- not-run: REASON -->``: skipped, and REASON must say why (GPU, Docker, ...).
- ``<!-- run: service ... -->``: it starts a server and does not return. It runs in the
  background until its HTTP port answers a completion, then its process group is stopped.

What differs from a user's shell, and why: the ports the README uses (8000, 6379) become
free ports, so that tests running side by side never collide; ``/tmp/`` becomes the test's
own temporary folder; ``tandem`` and ``python`` are this interpreter with this checkout on
``PYTHONPATH``; the bundled model is the test session's (TANDEM_CACHE_DIR), not ~/.cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SERVER_PORT = 8000  # the README's `tandem serve` port
REDIS_PORT = 6379
_MARKER = re.compile(r"^<!--\s*(?P<kind>not-run|run)\s*:\s*(?P<text>.*?)\s*-->$")
_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")

BASH_PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body --silent --show-error --max-time 120 "$@"; }
"""


@dataclass(frozen=True)
class Snippet:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    mode: str  # "run" | "service" | "not-run"
    reason: str = ""  # the marker's text

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang}"

    @property
    def uses_server(self) -> bool:
        """Talks to the README's `tandem serve` on port 8000 (one the test starts)."""
        return self.mode == "run" and _mentions(self.body, SERVER_PORT)


def extract(text: str) -> list[Snippet]:
    lines = text.splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None or not m.group("lang"):
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"README line {start + 1}: unclosed code fence")
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = _MARKER.match(prev)
        mode, reason = "run", ""
        if marker is not None:
            reason = marker.group("text")
            if marker.group("kind") == "not-run":
                mode = "not-run"
            elif reason.split()[0] == "service":
                mode = "service"
            else:
                raise ValueError(f"README line {start}: unknown marker {prev!r}")
        out.append(Snippet(start + 1, m.group("lang"), "\n".join(lines[start + 1 : j]) + "\n",
                           mode, reason))  # fmt: skip
        i = j + 1
    return out


def _mentions(body: str, port: int) -> bool:
    return re.search(rf"(?<![\d.]){port}(?!\d)", body) is not None


def substitute(body: str, ports: dict[int, int], tmp: Path) -> str:
    for old, new in ports.items():
        body = re.sub(rf"(?<![\d.]){old}(?!\d)", str(new), body)
    return body.replace("/tmp/", f"{tmp}/")


def environment(tmp: Path, cache_dir: Path) -> dict[str, str]:
    """PATH with ``tandem`` and ``python`` = this interpreter and checkout."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, target in (("tandem", f'"{sys.executable}" -m tandem.cli'),
                         ("python", f'"{sys.executable}"')):  # fmt: skip
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        TANDEM_CACHE_DIR=str(cache_dir),
        TANDEM_LOG_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def _command(snippet: Snippet, body: str) -> list[str]:
    if snippet.lang in ("bash", "sh", "shell"):
        return ["bash", "-c", BASH_PRELUDE + body]
    if snippet.lang == "python":
        return [sys.executable, "-c", body]
    raise AssertionError(
        f"README line {snippet.line}: no runner for ```{snippet.lang}; "
        "mark it <!-- not-run: REASON --> or teach tests/e2e/readme_snippets.py to run it"
    )


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the snippet's process group (its background jobs too), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            proc.poll()
            time.sleep(0.1)


def run(snippet: Snippet, body: str, env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run a ``run`` snippet to its end; AssertionError with its output unless it exits 0."""
    proc = subprocess.Popen(
        _command(snippet, body), cwd=cwd, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, grace_s=2)
        output, _ = proc.communicate()
        raise AssertionError(
            f"README snippet at line {snippet.line} ran past {timeout:g} s:\n{output}"
        ) from None
    finally:
        _kill_group(proc, grace_s=5)  # whatever it left in the background
    if proc.returncode != 0:
        raise AssertionError(
            f"README snippet at line {snippet.line} exited {proc.returncode}:\n"
            f"{body}\n--- output ---\n{output}"
        )
    return output


def run_service(
    snippet: Snippet, body: str, env: dict[str, str], cwd: Path, url: str, timeout: float
) -> dict:
    """Start a ``service`` snippet, wait until ``url`` serves a completion, stop it; return
    the completion. AssertionError if it exits first or never serves."""
    log = cwd / f"service-L{snippet.line}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            _command(snippet, body), cwd=cwd, env=env, text=True, start_new_session=True,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"README service snippet at line {snippet.line} exited "
                    f"{proc.returncode}:\n{log.read_text()}"
                )
            answer = completion(url)
            if answer is not None:
                return answer
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"README service snippet at line {snippet.line} did not serve in "
                    f"{timeout:g} s:\n{log.read_text()}"
                )
            time.sleep(0.5)
    finally:
        _kill_group(proc)


def completion(url: str) -> dict | None:
    """One small completion, or None while the server cannot give one."""
    body = json.dumps({"prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return None
