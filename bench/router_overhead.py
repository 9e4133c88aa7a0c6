"""Router overhead: the control plane alone, behind a model-free engine.

Starts, as real processes on loopback, one ``tandem decode-worker --fake-engine`` (it emits
one token per running request every ``--fake-step-ms``, no model) and one ``tandem router``
pinned to CPU 0 (``taskset -c 0``); the worker and this client run on the other CPUs. HTTP
connections are opened at most ``--connect-concurrency`` at a time (the streams themselves
all run at once): aiohttp's listen backlog is 128, and a burst of 1000 connects overflows it
(SYN retransmits of 1, 3, 7, 15 s show up as TTFT). Then, one phase after another on the
same two processes:

- ``direct``: N streams submitted straight to the worker over its msgpack control port
  (no router, no HTTP). Its inter-token latency (ITL) is the engine's own step interval as
  a client sees it: the baseline that isolates the router.
- ``router/ids`` and ``router/text``: N concurrent ``POST /v1/completions`` with
  ``stream: true`` (prompt as token ids, which skips tokenization, or as a short string),
  max_tokens tokens each with ignore_eos.

For each phase: output tokens/s (all tokens over the phase's wall time, and "steady": over
the window in which at least 90% of the streams were live), client-side ITL p50/p99 (gaps
between consecutive tokens of one stream, pooled), TTFT p50/p99, the router's CPU use (its
/proc counters over the phase, in % of one core: the average, and the peak over 0.5 s
windows, which shows saturation that the average hides) and the worker's and the client's. The router's added p99 ITL is read
against both the engine step (``p99 - step``) and the direct phase (``p99 - direct p99``).

The fake engine's tokens are ids that decode on their own, so each token is one SSE event
(the script checks events against the usage count).

    python bench/router_overhead.py --concurrency 1000 --fake-step-ms 20
    python bench/router_overhead.py --concurrency 100 --fake-step-ms 20
    python bench/router_overhead.py --concurrency 1000 --fake-step-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CLK_TCK = os.sysconf("SC_CLK_TCK")
TEXT_PROMPT = "Hello, Tandem! Tell me a story about a fox."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _tcp_counters() -> dict[str, int]:
    """Kernel TCP counters of this network namespace (ListenOverflows, TCPSynRetrans)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            d = dict(zip(head.split()[1:], map(int, values.split()[1:]), strict=False))
            return {k: d.get(k, 0) for k in ("ListenOverflows", "TCPSynRetrans")}
    return {}


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class Phase:
    name: str
    n_streams: int = 0
    n_tokens: int = 0
    n_failed: int = 0
    n_event_mismatch: int = 0
    wall_s: float = 0.0
    steady_tok_s: float = float("nan")
    itl: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    router_cpu_pct: float = float("nan")
    router_cpu_peak_pct: float = float("nan")  # highest over 0.5 s windows
    worker_cpu_pct: float = float("nan")
    client_cpu_pct: float = float("nan")
    tcp: dict[str, int] = field(default_factory=dict)  # kernel counter deltas over the phase

    @property
    def tok_s(self) -> float:
        return self.n_tokens / self.wall_s if self.wall_s else float("nan")


def _finish(phase: Phase, t0: float, streams: list[tuple[float, list[float]]]) -> None:
    """Fill latencies and throughput from per-stream (send time, token arrival times)."""
    ends = [times[-1] for _, times in streams if times]
    phase.wall_s = (max(ends) if ends else time.perf_counter()) - t0
    for sent, times in streams:
        if times:
            phase.ttft.append(times[0] - sent)
            phase.itl.extend(b - a for a, b in zip(times, times[1:], strict=False))
    # Steady window: while at least 90% of the streams are live (between their first and
    # last tokens), so the ramp-up of connections and the tail do not dilute the rate.
    edges = sorted(
        [(times[0], 1) for _, times in streams if times]
        + [(times[-1], -1) for _, times in streams if times]
    )
    live, lo, hi, threshold = 0, None, None, 0.9 * len(streams)
    for t, step in edges:
        was_steady = live >= threshold
        live += step
        if live >= threshold and lo is None:
            lo = t
        elif was_steady and live < threshold:
            hi = t  # the last time it falls below the threshold wins
    if lo is not None and hi is not None and hi > lo:
        n = sum(1 for _, times in streams for t in times if lo <= t <= hi)
        phase.steady_tok_s = n / (hi - lo)
    phase.itl.sort()
    phase.ttft.sort()


# ---------------------------------------------------------------------- processes
class Stack:
    """One fake-engine worker and one router, as subprocesses; the router on CPU 0."""

    def __init__(self, model: str, step_ms: float, concurrency: int, max_tokens: int) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.pinned = len(cpus) >= 2 and shutil.which("taskset") is not None
        # Router alone on the first CPU; with 3+ CPUs the worker and this client get one each
        # (the client is one Python thread), with 2 they share the second.
        self.router_cpus = str(cpus[0])
        self.worker_cpus = str(cpus[1]) if self.pinned else None
        client = cpus[2:] if len(cpus) >= 3 else cpus[1:]
        self.client_cpus = ",".join(map(str, client)) if self.pinned else None
        env = {**os.environ, "TANDEM_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
        seqs = max(concurrency, 256)
        blocks = seqs * -(-(64 + max_tokens) // 16)
        worker_port = _free_port()
        cmd = [sys.executable, "-m", "tandem.cli", "decode-worker", "--fake-engine",
               "--fake-step-ms", str(step_ms), "--model", model, "--port", str(worker_port),
               "--max-num-seqs", str(seqs), "--kv-blocks", str(blocks),
               "--quiet", "--ready-fd", "1"]  # fmt: skip
        self.worker = subprocess.Popen(
            self._pin(cmd, self.worker_cpus), env=env, stdout=subprocess.PIPE
        )
        self.worker_addr = self._wait_ready(self.worker)
        self.port = _free_port()
        cmd = [sys.executable, "-m", "tandem.cli", "router", "--model", model,
               "--worker", self.worker_addr, "--port", str(self.port), "--served-model-name", "fake",
               "--max-in-flight", str(max(4096, 2 * concurrency))]  # fmt: skip
        self.router = subprocess.Popen(
            self._pin(cmd, self.router_cpus), env=env, stdout=subprocess.DEVNULL
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy()
        if self.pinned:
            os.sched_setaffinity(0, {int(c) for c in self.client_cpus.split(",")})

    def _pin(self, cmd: list[str], cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus, *cmd] if self.pinned and cpus else cmd

    @staticmethod
    def _wait_ready(proc: subprocess.Popen, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline().decode()
                if line.startswith("TANDEM_WORKER_READY"):
                    return line.split()[1]
            if proc.poll() is not None:
                raise RuntimeError("the fake-engine worker exited during start-up")
        raise RuntimeError("the fake-engine worker did not become ready")

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.router.poll() is not None:
                raise RuntimeError("the router exited during start-up")
            time.sleep(0.2)
        raise RuntimeError("the router did not become healthy")

    def close(self) -> None:
        for proc in (self.router, self.worker):  # router first: it would log the lost worker
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---------------------------------------------------------------------- clients
async def run_direct(addr: str, n: int, prompt_ids: list[int], max_tokens: int) -> Phase:
    """N streams on one msgpack connection straight to the worker (no router)."""
    from tandem import protocol
    from tandem.request import SamplingParams

    host, _, port = addr.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=2**24)
    await protocol.read_message(reader)  # hello
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    phase = Phase("direct (worker, no router)", n_streams=n)
    times: dict[str, list[float]] = {f"d{i}": [] for i in range(n)}
    t0 = time.perf_counter()
    submits = (protocol.Submit(r, list(prompt_ids), params) for r in times)
    writer.write(b"".join(protocol.encode(m) for m in submits))
    left = n
    while left:
        msg = await protocol.read_message(reader)
        now = time.perf_counter()
        if not isinstance(msg, protocol.Tokens):
            continue
        for item in msg.items:
            times[item.request_id].extend([now] * len(item.new_token_ids))
            if item.error is not None:
                phase.n_failed += 1
            if item.finished:
                left -= 1
    writer.close()
    phase.n_tokens = sum(len(t) for t in times.values())
    _finish(phase, t0, [(t0, t) for t in times.values()])
    return phase


async def _stream(
    session, url: str, body: dict, phase: Phase, gate: asyncio.Semaphore | None
) -> tuple[float, list[float]]:
    times: list[float] = []
    usage = None
    sent = time.perf_counter()
    try:
        if gate is None:
            resp = await session.post(url, json=body)
        else:  # ramp: at most N connections being set up at once; streaming is not limited
            async with gate:
                sent = time.perf_counter()
                resp = await session.post(url, json=body)
        async with resp:
            if resp.status != 200:
                phase.n_failed += 1
                return sent, times
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if ev == b"data: [DONE]":
                        continue
                    if b'"usage"' in ev and b'"choices": []' in ev:
                        usage = json.loads(ev[6:])["usage"]["completion_tokens"]
                    elif b'"error"' in ev:
                        phase.n_failed += 1
                    else:
                        times.append(now)
    except Exception:  # noqa: BLE001  a broken stream counts as failed, the run goes on
        phase.n_failed += 1
    if usage is not None and usage != len(times):
        phase.n_event_mismatch += 1
    phase.n_tokens += usage if usage is not None else len(times)
    return sent, times


async def run_router(
    url: str, n: int, prompt, max_tokens: int, name: str, connect_concurrency: int = 0
) -> Phase:
    import aiohttp

    body = {"model": "fake", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    phase = Phase(name, n_streams=n)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    gate = asyncio.Semaphore(connect_concurrency) if connect_concurrency > 0 else None
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        streams = await asyncio.gather(
            *(_stream(session, url + "/v1/completions", body, phase, gate) for _ in range(n))
        )
    _finish(phase, t0, list(streams))
    return phase


async def _sample_cpu(pid: int, out: list[float], period: float = 0.5) -> None:
    """Append a process's CPU % over each ``period`` (to see saturation behind an average)."""
    last, t_last = _cpu_seconds(pid), time.perf_counter()
    while True:
        await asyncio.sleep(period)
        now, t_now = _cpu_seconds(pid), time.perf_counter()
        out.append(100 * (now - last) / (t_now - t_last))
        last, t_last = now, t_now


async def measure(coro, pids: dict[str, int]) -> Phase:
    cpu0 = {k: _cpu_seconds(p) for k, p in pids.items()}
    client0 = time.process_time()
    tcp0 = _tcp_counters()
    t0 = time.perf_counter()
    peaks: list[float] = []
    sampler = asyncio.create_task(_sample_cpu(pids["router"], peaks))
    phase = await coro
    wall = time.perf_counter() - t0
    sampler.cancel()
    phase.router_cpu_peak_pct = max(peaks, default=float("nan"))
    for k, p in pids.items():
        setattr(phase, f"{k}_cpu_pct", 100 * (_cpu_seconds(p) - cpu0[k]) / wall)
    phase.client_cpu_pct = 100 * (time.process_time() - client0) / wall
    phase.tcp = {k: v - tcp0.get(k, 0) for k, v in _tcp_counters().items()}
    return phase


# ---------------------------------------------------------------------- report
def _ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def report(phases: list[Phase], args: argparse.Namespace, stack: Stack) -> None:
    step = args.fake_step_ms / 1000
    direct = next((p for p in phases if p.name.startswith("direct")), None)
    print()
    for p in phases:
        print(
            f"{p.name}: {p.n_streams} streams, {p.n_tokens} tokens in {p.wall_s:.2f}s, "
            f"failed {p.n_failed}, event/usage mismatches {p.n_event_mismatch}, "
            f"TTFT p50 {_ms(_pct(p.ttft, 0.5))} ms p99 {_ms(_pct(p.ttft, 0.99))} ms, "
            f"ITL max {_ms(p.itl[-1] if p.itl else float('nan'))} ms, "
            f"steady {p.steady_tok_s:.0f} tok/s, CPU % router {p.router_cpu_pct:.0f} "
            f"worker {p.worker_cpu_pct:.0f} client {p.client_cpu_pct:.0f}, kernel {p.tcp}"
        )
    pin = (
        f"router on CPU {stack.router_cpus}, worker on {stack.worker_cpus}, "
        f"client on {stack.client_cpus}"
        if stack.pinned
        else "NOT pinned (one CPU or no taskset)"
    )
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "?",
    )  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), load average at start {args.load_at_start}")
    print(
        f"\nconcurrency {args.concurrency}, fake step {args.fake_step_ms} ms, "
        f"max_tokens {args.max_tokens}, connect ramp {args.connect_concurrency or 'off'}, {pin}\n"
    )
    print(
        "| path | concurrency | tokens/s | steady tok/s | p99 TTFT ms | p50 ITL ms | p99 ITL ms "
        "| added p99 vs step ms | added p99 vs direct ms | router CPU % avg / peak |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p in phases:
        p99 = _pct(p.itl, 0.99)
        vs_direct = "" if direct is None or p is direct else _ms(p99 - _pct(direct.itl, 0.99))
        vs_step = _ms(p99 - step)
        if step == 0:  # flat out, tokens queue and arrive in bursts: ITL measures batching
            vs_direct = vs_step = "n/a"
        cpu = "" if p is direct else f"{p.router_cpu_pct:.0f} / {p.router_cpu_peak_pct:.0f}"
        print(
            f"| {p.name} | {p.n_streams} | {p.tok_s:.0f} | {p.steady_tok_s:.0f} "
            f"| {_ms(_pct(p.ttft, 0.99))} "
            f"| {_ms(_pct(p.itl, 0.5))} | {_ms(p99)} | {vs_step} | {vs_direct} | {cpu} |"
        )


async def main_async(args: argparse.Namespace, stack: Stack) -> list[Phase]:
    pids = {"router": stack.router.pid, "worker": stack.worker.pid}
    prompt_ids = list(range(300, 308))
    # Warm-up: first requests pay for lazy imports and connection set-up.
    await run_router(stack.url, 8, prompt_ids, 8, "warm-up")
    phases = []
    if not args.no_direct:
        coro = run_direct(stack.worker_addr, args.concurrency, prompt_ids, args.max_tokens)
        phases.append(await measure(coro, pids))
    kinds = ["ids", "text"] if args.prompt == "both" else [args.prompt]
    for kind in kinds:
        prompt = prompt_ids if kind == "ids" else TEXT_PROMPT
        coro = run_router(
            stack.url, args.concurrency, prompt, args.max_tokens, f"router/{kind}",
            args.connect_concurrency,
        )  # fmt: skip
        phases.append(await measure(coro, pids))
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=1000, help="concurrent streams")
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per stream")
    ap.add_argument(
        "--fake-step-ms", type=float, default=20.0, help="fake engine step (0: flat out)"
    )
    ap.add_argument(
        "--prompt", choices=["ids", "text", "both"], default="both", help="prompt form(s) to run"
    )
    ap.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="HTTP connections set up at once (0: all at once; the router's listen backlog "
        "is aiohttp's default 128, so a burst of 1000 connects overflows it)",
    )
    ap.add_argument("--no-direct", action="store_true", help="skip the direct-to-worker baseline")
    ap.add_argument("--model", default=None, help="tokenizer folder (default: bundled tiny model)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from tandem.tinymodel import default_model_dir

        model = str(default_model_dir())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    args.load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stack = Stack(model, args.fake_step_ms, args.concurrency, args.max_tokens)
    try:
        phases = asyncio.run(main_async(args, stack))
        exits = {"worker": stack.worker.poll(), "router": stack.router.poll()}
    finally:
        stack.close()
    if any(p.n_failed for p in phases) or any(code is not None for code in exits.values()):
        print(f"\nFAILED streams; process exit codes before shutdown (None = alive): {exits}")
    report(phases, args, stack)


if __name__ == "__main__":
    main()
