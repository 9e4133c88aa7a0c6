"""Job completion time per policy over HTTP (issue 15): ``tandem serve`` per policy, driven
by ``tandem loadgen``, in one run.

1. The cost model is profiled once (``tandem profile-cost-model``, same engine flags) unless
   ``--cost-model FILE`` is given; every server gets the same file (``--cost-model``), so
   the policies share one cost model and no server profiles at start-up. The file is kept
   next to the JSON result: it is the input of ``bench/sched_sim.py --cost-model``.
2. Capacity: a ``--policy fcfs`` server takes ``--capacity-requests`` ShareGPT-like
   requests all at once; capacity = completed requests / loadgen's duration (first sent
   to last token; it includes the drain, so it is a conservative figure).
3. For each policy in ``--policies``: one ``tandem serve --policy P --cost-model FILE``
   (warm-up: a few short requests), then each setting of ``--settings`` on the same server,
   one after another: ``poisson@0.9`` = Poisson arrivals at 0.9 × capacity, ``bursty@1.1`` =
   gamma arrivals with burstiness 0.25 at 1.1 × capacity. Every policy sees the same
   requests (loadgen's ``sharegpt-like`` workload, same seed) and the same arrival times
   (same seed and rate). ``ignore_eos``: the output lengths are the workload's.

JCT = loadgen's end-to-end latency (request sent to last token). Printed per setting:
mean / p50 / p99 JCT per policy and fcfs ÷ policy (above 1 = better than fcfs). Nothing
is asserted: the numbers are the result.

    # one H200, about 5-8 minutes:
    PYTHONPATH=. python bench/gpu_jct.py --model random:llama-3-8b --device cuda
    # functional check on the CPU with the bundled tiny model (tests/e2e/test_bench_smoke.py):
    PYTHONPATH=. python bench/gpu_jct.py --device cpu --num-requests 6 --capacity-requests 6 \\
        --max-input-len 32 --max-output-len 8 --out /tmp/jct.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository root, not bench/, on the path

from bench.gpu_http import free_port, wait_healthy  # noqa: E402

SETTINGS = {"poisson@0.9": (0.9, 1.0), "bursty@1.1": (1.1, 0.25)}


def engine_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--dtype", args.dtype]
    if args.model:
        flags = ["--model", args.model, *flags]
    return flags


def serve_flags(args: argparse.Namespace) -> list[str]:
    return ["--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            *shlex.split(args.serve_args)]  # fmt: skip


def tokenizer_of(args: argparse.Namespace) -> str | None:
    if args.model and args.model.startswith("random:"):
        from tandem.random_model import resolve_model

        return str(resolve_model(args.model))
    return args.model  # a folder, or None: loadgen asks the server's bundled model


def run_loadgen(url: str, args, out: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "loadgen", "--url", url, "--ignore-eos", "--temperature", "0",
           "--no-progress", "--timeout", "1200", "--out", str(out), *extra]  # fmt: skip
    tok = tokenizer_of(args)
    if tok:
        cmd += ["--tokenizer", tok]
    subprocess.run(cmd, check=True, stdout=None if args.verbose else subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def workload_flags(args, n: int) -> list[str]:
    return ["--workload", "sharegpt-like", "--num-requests", str(n), "--seed", str(args.seed),
            "--max-input-len", str(args.max_input_len),
            "--max-output-len", str(args.max_output_len)]  # fmt: skip


class Server:
    """``tandem serve`` as a child process group; ``with`` stops it."""

    def __init__(self, args, policy: str, cost_model: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "tandem.cli", "serve", *engine_flags(args),
                    "--policy", policy, "--cost-model", str(cost_model), *serve_flags(args),
                    "--port", str(self.port)]  # fmt: skip
        self.log_path = log
        self.timeout = args.start_timeout

    def __enter__(self) -> Server:
        print(f"  {' '.join(self.cmd)}", flush=True)
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the server's whole life
        self.proc = subprocess.Popen(
            self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        t0 = time.perf_counter()
        try:
            wait_healthy(self.url, self.proc, self.timeout)
        except BaseException:
            self.__exit__()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        if exc and exc[0] is not None:
            tail = self.log_path.read_text().splitlines()[-30:]
            print("  serve log tail:\n" + "\n".join(tail), flush=True)


def summarize(s: dict[str, Any]) -> dict[str, Any]:
    e = s["e2el_ms"]
    return dict(
        completed=s["completed"], errors=s["errors"], duration_s=s["duration_s"],
        jct_s_mean=e["mean"] / 1e3, jct_s_p50=e["p50"] / 1e3, jct_s_p99=e["p99"] / 1e3,
        ttft_ms_p50=s["ttft_ms"]["p50"], ttft_ms_p99=s["ttft_ms"]["p99"],
        output_tokens_per_s=s["output_throughput"],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="as tandem serve (default: the tiny model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--policies", default="fcfs,mlfq,alise")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--num-requests", type=int, default=400, help="per setting and policy")
    ap.add_argument("--capacity-requests", type=int, default=400)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--serve-args", default="", help="more flags for every tandem serve")
    ap.add_argument("--cost-model", default=None, help="JSON cost model (default: profile once)")
    ap.add_argument("--warmup-requests", type=int, default=8)
    ap.add_argument("--start-timeout", type=float, default=420.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default=None, help="JSON result (default on CUDA: bench/results/)")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    policies = args.policies.split(",")
    settings = args.settings.split(",")
    for name in settings:
        if name not in SETTINGS:
            ap.error(f"--settings: unknown {name!r}; choose from {', '.join(SETTINGS)}")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_jct-"))
    out = Path(args.out) if args.out else None
    if out is None and args.device.startswith("cuda"):
        out = Path("bench/results/gpu_jct_h200.json")

    cost_path = Path(args.cost_model) if args.cost_model else None
    if cost_path is None:
        cost_path = out.with_name(out.stem + "_cost_model.json") if out else work / "cost.json"
        cost_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tandem.cli", "profile-cost-model", str(cost_path),
               *engine_flags(args), "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens)]  # fmt: skip
        print(f"== cost model: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"  profiled in {time.perf_counter() - t0:.0f} s", flush=True)
    cost = json.loads(cost_path.read_text())

    print("== capacity (fcfs, all requests at once)", flush=True)
    with Server(args, "fcfs", cost_path, work / "serve-capacity.log") as srv:
        s = run_loadgen(srv.url, args, work / "capacity",
                        [*workload_flags(args, args.capacity_requests), "--request-rate", "inf"])  # fmt: skip
    cap = s["completed"] / s["duration_s"]
    print(f"  capacity {cap:.2f} req/s ({s['completed']} in {s['duration_s']:.1f} s)", flush=True)

    results: dict[str, dict[str, Any]] = {name: {} for name in settings}
    for policy in policies:
        print(f"== {policy}", flush=True)
        try:
            with Server(args, policy, cost_path, work / f"serve-{policy}.log") as srv:
                run_loadgen(srv.url, args, work / f"warm-{policy}",
                            ["--workload", "random", "--input-len", "64", "--output-len", "8",
                             "--num-requests", str(args.warmup_requests), "--seed", "1",
                             "--request-rate", "inf"])  # fmt: skip
                for name in settings:
                    load, burst = SETTINGS[name]
                    s = run_loadgen(srv.url, args, work / f"{policy}-{name}",
                                    [*workload_flags(args, args.num_requests),
                                     "--request-rate", f"{load * cap:.6f}",
                                     "--burstiness", str(burst)])  # fmt: skip
                    results[name][policy] = r = summarize(s)
                    print(f"  {name}: mean JCT {r['jct_s_mean']:.3f} s, p99 {r['jct_s_p99']:.3f} s,"
                          f" {r['completed']} done, {r['errors']} errors", flush=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - recorded; the other policies still run
            print(f"  {policy} failed: {type(e).__name__}: {e}", flush=True)
            for name in settings:
                results[name].setdefault(policy, {"error": f"{type(e).__name__}: {e}"})

    print("\n| setting | policy | mean JCT s | p50 JCT s | p99 JCT s | mean: fcfs ÷ policy "
          "| p99: fcfs ÷ policy | errors |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in settings:
        base = results[name].get("fcfs", {})
        for policy, r in results[name].items():
            if "error" in r:
                print(f"| {name} | {policy} | error: {r['error'][:60]} | | | | | |")
                continue
            if "jct_s_mean" in base:
                r["mean_ratio_vs_fcfs"] = base["jct_s_mean"] / r["jct_s_mean"]
                r["p99_ratio_vs_fcfs"] = base["jct_s_p99"] / r["jct_s_p99"]
            mean_r, p99_r = (f"{r[k]:.2f}×" if k in r else "—"
                             for k in ("mean_ratio_vs_fcfs", "p99_ratio_vs_fcfs"))  # fmt: skip
            print(f"| {name} | {policy} | {r['jct_s_mean']:.3f} | {r['jct_s_p50']:.3f} | "
                  f"{r['jct_s_p99']:.3f} | {mean_r} | {p99_r} | {r['errors']} |")  # fmt: skip
    device = args.device
    if args.device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(torch.device(args.device))
    payload = dict(
        device=device, model=args.model, dtype=args.dtype, capacity_req_s=cap,
        settings={k: dict(load=SETTINGS[k][0], burstiness=SETTINGS[k][1]) for k in settings},
        workload=dict(kind="sharegpt-like", seed=args.seed, num_requests=args.num_requests,
                      max_input_len=args.max_input_len, max_output_len=args.max_output_len,
                      ignore_eos=True),
        serve_flags=serve_flags(args), cost_model=cost, results=results,
        wall_s=time.perf_counter() - started,
        command=" ".join(["python", "bench/gpu_jct.py", *(argv or sys.argv[1:])]),
    )  # fmt: skip
    print(f"wall {payload['wall_s']:.0f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
