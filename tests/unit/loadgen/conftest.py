"""Fixtures for loadgen's CLI tests: a fake OpenAI streaming server and real run folders.

The runs are made by ``loadgen.cli.main`` exactly as a user's ``tandem loadgen`` would make
them (same arguments, same files), against a small aiohttp server in a background thread
that streams ``max_tokens`` one-character chunks, so every file a later ``compare`` or plot
reads is real loadgen output.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

SLO = "ttft:500,tpot:50,e2el:4000"


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n = int(body["max_tokens"])
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(n):
        await asyncio.sleep(0.002)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
    usage = {"choices": [], "usage": {"completion_tokens": n}}
    await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture(scope="session")
def fake_server() -> Iterator[str]:
    """URL of a fake OpenAI-compatible streaming server, serving until the session ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/completions", _completions)
    runner = web.AppRunner(app)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10), "fake server did not start"
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@dataclass(frozen=True)
class Cli:
    """Outcome of one in-process ``tandem loadgen`` invocation."""

    rc: int
    stdout: str
    stderr: str


def run_cli(*argv: str) -> Cli:
    """``tandem loadgen ARGV`` in this process (``compare ...`` included); output captured."""
    from loadgen.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv), prog="tandem loadgen")
        except SystemExit as e:  # argparse errors and --help
            rc = int(e.code or 0)
    return Cli(rc, out.getvalue(), err.getvalue())


@dataclass(frozen=True)
class Runs:
    """Folders written by real runs: two single runs (with and without --slo), one sweep."""

    slo: Path
    noslo: Path
    sweep: Path
    stdout: dict[str, str]  # folder name -> what the run printed


@pytest.fixture(scope="session")
def runs(fake_server: str, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("loadgen_runs")
    common = ["--url", fake_server, "--tokenizer", str(tiny_llama_dir), "--workload", "random",
              "--input-len", "16", "--output-len", "6", "--num-requests", "6", "--seed", "1",
              "--no-progress"]  # fmt: skip
    made = Runs(root / "slo", root / "noslo", root / "sweep", {})
    for args in (
        ["--request-rate", "40", "--slo", SLO, "--out", str(made.slo)],
        ["--request-rate", "40", "--out", str(made.noslo)],
        ["--request-rate", "20,40", "--slo", SLO, "--out", str(made.sweep)],
    ):
        result = run_cli(*common, *args)
        assert result.rc == 0, result.stderr
        made.stdout[Path(args[-1]).name] = result.stdout
    return made


def row(stdout: str, name: str) -> str:
    """The first line of ``stdout`` that starts with ``name`` (a table row)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(name)]
    assert lines, f"no {name!r} row in:\n{stdout}"
    return lines[0]
