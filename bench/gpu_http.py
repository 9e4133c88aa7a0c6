"""The HTTP path on one GPU: ``tandem serve`` driven by ``tandem loadgen``, against the
in-process engine on the same workload, in the same run.

1. A workload of ``--num-requests`` (input lengths uniform in [--min-input, --max-input],
   ``--output-len`` out, or ``--workload sharegpt-like``; the lengths of
   ``bench/gpu_serving.py`` for the same seed) is written as a JSONL trace of
   ``prompt_len`` / ``output_len``.
2. ``tandem serve --model random:NAME --device cuda --dtype bfloat16 --policy fcfs
   --max-num-seqs 256 --max-num-batched-tokens 8192`` (plus ``--serve-args``) starts; once
   ``/health`` answers, loadgen sends a short warm-up, then the trace, all at once, with
   ``ignore_eos`` (``python -m loadgen --dataset-path trace --request-rate inf``: streamed
   ``/v1/completions``, text prompts of exactly those token lengths). CPU seconds of the
   router (the serve process) and of the worker process are read from /proc over the run.
3. The server stops; the in-process engine (``LLMEngine``, the same engine flags, warmed
   up the same way) runs the same lengths: loadgen's own prompt lengths, random ids.

Per system: output tok/s = output tokens / (first request sent to last token), TTFT and
TPOT (vLLM's definitions) p50 / p99. Target: HTTP output tok/s >= 0.95 of in-process.
A system that fails is recorded with its error; the other still runs.

    PYTHONPATH=. python bench/gpu_http.py                      # Llama-3-8B shapes, 256 requests
    PYTHONPATH=. python bench/gpu_http.py --serve-args "--no-async-scheduling"
    PYTHONPATH=. python bench/gpu_http.py --device cpu --model llama-3-debug --num-requests 8 \\
        --output-len 8 --min-input 8 --max-input 32 --out /tmp/h.json   # a functional check
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.95


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tandem serve exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"tandem serve not healthy after {timeout:.0f} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def loadgen(url: str, args: argparse.Namespace, tokenizer: str, out: Path, extra: list[str]):
    cmd = [sys.executable, "-m", "loadgen", "--url", url, "--tokenizer", tokenizer,
           "--ignore-eos", "--temperature", "0", "--request-rate", "inf", "--no-progress",
           "--timeout", "1200", "--out", str(out), *extra]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "results.json").read_text())
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    return summary, rows, wall


def run_http(args, model_ref: str, tokenizer: str, trace: Path, work: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", model_ref,
           "--device", args.device, "--dtype", args.dtype, "--policy", "fcfs",
           "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--port", str(port), *shlex.split(args.serve_args)]  # fmt: skip
    log_path = work / "serve.log"
    print(f"  {' '.join(cmd)}", flush=True)
    log = open(log_path, "w")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.perf_counter()
        wait_healthy(url, proc, args.start_timeout)
        start_s = time.perf_counter() - t0
        workers = children(proc.pid)
        print(f"  healthy after {start_s:.1f} s; worker pids {workers}", flush=True)
        loadgen(url, args, tokenizer, work / "warm", [
            "--workload", "random", "--input-len", "256", "--output-len", "16",
            "--num-requests", str(args.warmup_requests), "--seed", "1",
        ])  # fmt: skip
        pids = {"router": proc.pid, **{f"worker{i}": p for i, p in enumerate(workers)}}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        summary, rows, wall = loadgen(url, args, tokenizer, work / "run",
                                      ["--dataset-path", str(trace)])  # fmt: skip
        cpu = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    except BaseException:
        log.flush()
        tail = log_path.read_text().splitlines()[-40:]
        print("  serve log tail:\n" + "\n".join(tail), flush=True)
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:  # it had exited already
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    if summary["errors"]:
        raise RuntimeError(f"{summary['errors']} requests failed: {summary['error_kinds']}")
    dur = summary["duration_s"]
    return dict(
        output_tokens=summary["total_output_tokens"], makespan_s=dur,
        output_tokens_per_s=summary["output_throughput"],
        ttft_ms_p50=summary["ttft_ms"]["p50"], ttft_ms_p99=summary["ttft_ms"]["p99"],
        tpot_ms_p50=summary["tpot_ms"]["p50"], tpot_ms_p99=summary["tpot_ms"]["p99"],
        tpot_ms_mean=summary["tpot_ms"]["mean"], itl_ms_p99=summary["itl_ms"]["p99"],
        serve_command=cmd, start_s=start_s, loadgen_wall_s=wall,
        cpu_seconds=cpu, cpu_share_of_run={k: v / dur for k, v in cpu.items()},
        prompt_lens=[int(r["prompt_len"]) for r in rows],
        output_lens=[int(r["requested_output_len"]) for r in rows],
    )  # fmt: skip


def run_inprocess(args, folder: str, prompt_lens: list[int], output_lens: list[int]):
    import numpy as np

    from bench import gpu_serving as gs

    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(gs.TOKEN_LOW, gs.TOKEN_HIGH, n).tolist() for n in prompt_lens]
    wl = gs.Workload(prompts, output_lens)
    warm = gs.Workload([rng.integers(gs.TOKEN_LOW, gs.TOKEN_HIGH, 256).tolist()
                        for _ in range(args.warmup_requests)], [16] * args.warmup_requests)  # fmt: skip
    ns = argparse.Namespace(
        device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_blocks=None,
        gpu_memory_utilization=0.9, async_scheduling=None,
    )  # fmt: skip
    return gs.run_tandem(ns, folder, "fcfs", wl, warm)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="llama-3-8b", help="a tandem/model_configs name")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--workload", choices=("uniform", "sharegpt-like"), default="uniform")
    ap.add_argument("--min-input", type=int, default=64)
    ap.add_argument("--max-input", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--serve-args", default="", help="more flags for tandem serve")
    ap.add_argument("--warmup-requests", type=int, default=16)
    ap.add_argument("--start-timeout", type=float, default=420.0)
    ap.add_argument("--systems", default="http,inproc")
    ap.add_argument("--verbose", action="store_true", help="show loadgen's output")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    from bench import gpu_serving as gs
    from tandem.config import ModelConfig
    from tandem.random_model import resolve_model

    model_ref = f"random:{args.model}"
    folder = resolve_model(model_ref)
    cfg = ModelConfig.from_pretrained(folder)
    wl = gs.make_workload(args.workload, args.num_requests, args.seed, args.min_input,
                          args.max_input, args.output_len, cfg.vocab_size)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="gpu_http-"))
    trace = work / "trace.jsonl"
    trace.write_text("".join(json.dumps({"prompt_len": n, "output_len": o}) + "\n"
                             for n, o in zip(wl.input_lens, wl.output_lens, strict=True)))  # fmt: skip
    results: dict[str, Any] = {}
    lens = (wl.input_lens, wl.output_lens)
    if "http" in args.systems:
        print("\n== http (tandem serve + tandem loadgen)", flush=True)
        try:
            results["http"] = run_http(args, model_ref, folder, trace, work)
            lens = (results["http"]["prompt_lens"], results["http"]["output_lens"])
        except Exception as e:  # noqa: BLE001 - recorded; the in-process run still happens
            traceback.print_exc()
            results["http"] = {"error": f"{type(e).__name__}: {e}"}
    if "inproc" in args.systems:
        print("\n== in-process LLMEngine", flush=True)
        try:
            results["inproc"] = run_inprocess(args, folder, *lens)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results["inproc"] = {"error": f"{type(e).__name__}: {e}"}
    h, i = results.get("http", {}), results.get("inproc", {})
    ratio = None
    if "output_tokens_per_s" in h and "output_tokens_per_s" in i:
        ratio = h["output_tokens_per_s"] / i["output_tokens_per_s"]
    device = args.device
    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(torch.device(args.device))
    payload = dict(
        device=device, model=args.model, dtype=args.dtype, serve_args=args.serve_args,
        workload=dict(kind=args.workload, seed=args.seed, min_input=args.min_input,
                      max_input=args.max_input, output_len=args.output_len,
                      arrivals="all at once", ignore_eos=True, **wl.describe()),
        results={k: {kk: vv for kk, vv in v.items() if kk not in ("prompt_lens", "output_lens")}
                 for k, v in results.items()},
        http_over_inprocess=ratio, target=TARGET_RATIO,
        command=" ".join(["python", "bench/gpu_http.py", *(argv or sys.argv[1:])]),
    )  # fmt: skip
    print("\n| system | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error'][:60]} | | | | |")
            continue
        print(f"| {name} | {r['output_tokens_per_s']:.0f} | {r['ttft_ms_p50']:.1f} | "
              f"{r['ttft_ms_p99']:.1f} | {r['tpot_ms_p50']:.2f} | {r['tpot_ms_p99']:.2f} |")  # fmt: skip
    if "cpu_share_of_run" in h:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in h["cpu_share_of_run"].items())
        print(f"CPU cores busy during the HTTP run: {shares}")
    if ratio is not None:
        verdict = "met" if ratio >= TARGET_RATIO else "missed"
        print(f"HTTP / in-process output tok/s: {ratio:.3f} (target {TARGET_RATIO}: {verdict})")
    if args.device.startswith("cuda"):
        from bench import gpu_common as g

        path = g.write_result("gpu_http", payload)
        print(f"wrote {path}")
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
