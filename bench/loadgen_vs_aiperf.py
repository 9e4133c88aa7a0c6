"""Cross-check `tandem loadgen` against an independent client (NVIDIA aiperf, from PyPI).

Starts `tandem serve` on the bundled model, then runs the same workload (random prompts of
--input-len tokens, --output-len tokens out with ignore_eos, --concurrency requests kept in flight,
--num-requests; a fixed concurrency gives both clients the same load shape, where two
Poisson schedules would differ) alternately with loadgen and with aiperf, --rounds times each, and prints
the TTFT and TPOT medians of every run and the ratio loadgen / aiperf of their means.

aiperf runs offline against the local tokenizer folder. It is told to use the server's
token counts (--use-server-token-count): re-tokenizing the tiny model's random output text
gives other counts than the tokens generated (BPE merges across token boundaries), which
would change its TPOT denominator. aiperf's "inter_token_latency" is vLLM's TPOT
((latency - TTFT) / (output tokens - 1)).

    pip install aiperf   # into any venv; give its executable with --aiperf
    python bench/loadgen_vs_aiperf.py --aiperf /tmp/peer/bin/aiperf --server-cpus 0 --client-cpus 1

Pin the server and the clients to different cores: aiperf runs several processes (workers,
record processors, a controller), which on a small machine take CPU from the server while
it is being measured, and that changes the latencies it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.servers import serve  # noqa: E402

CLIENT: list[str] = []  # command prefix that pins a client to --client-cpus


def server_means(url: str, before: dict | None = None) -> dict:
    """The router's TTFT / TPOT sums and counts (seconds); with ``before``, the means (ms)
    of the requests served since."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    vals = {}
    for line in lines:
        for m in ("ttft", "tpot"):
            for part in ("sum", "count"):
                if line.startswith(f"tandem_request_{m}_seconds_{part} "):
                    vals[f"{m}_{part}"] = float(line.split()[1])
    if before is None:
        return vals
    return {
        m: 1000
        * (vals[f"{m}_sum"] - before[f"{m}_sum"])
        / max(vals[f"{m}_count"] - before[f"{m}_count"], 1)
        for m in ("ttft", "tpot")
    }


def run_loadgen(url, tok, args, out: Path) -> dict:
    subprocess.run(
        [
            *CLIENT,
            sys.executable,
            "-m",
            "loadgen",
            "--url",
            url,
            "--tokenizer",
            str(tok),
            "--workload",
            "random",
            "--input-len",
            str(args.input_len - 1),
            "--output-len",
            str(args.output_len),
            "--ignore-eos",
            "--max-concurrency",
            str(args.concurrency),
            "--num-requests",
            str(args.num_requests),
            "--seed",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # input_len - 1 above: the server adds BOS, and aiperf's ISL excludes it too
    r = json.loads((out / "results.json").read_text())
    return {"ttft_p50": r["ttft_ms"]["p50"], "tpot_p50": r["tpot_ms"]["p50"],
            "ttft_mean": r["ttft_ms"]["mean"], "tpot_mean": r["tpot_ms"]["mean"],
            "completed": r["completed"], "errors": r["errors"]}  # fmt: skip


def run_aiperf(url, tok, model, args, out: Path) -> dict:
    subprocess.run(
        [*CLIENT, args.aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "completions",
         "--streaming", "--tokenizer", str(tok), "--isl", str(args.input_len - 1),
         "--osl", str(args.output_len), "--extra-inputs", "ignore_eos:true",
         "--use-server-token-count", "--concurrency", str(args.concurrency),
         "--request-count", str(args.num_requests), "--random-seed", "0",
         "--artifact-dir", str(out), "--ui-type", "none", "--no-auto-plot", "--no-server-metrics", "--no-gpu-telemetry"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    r = json.loads((out / "profile_export_aiperf.json").read_text())
    return {"ttft_p50": r["time_to_first_token"]["p50"], "tpot_p50": r["inter_token_latency"]["p50"],
            "ttft_mean": r["time_to_first_token"]["avg"], "tpot_mean": r["inter_token_latency"]["avg"],
            "completed": int(r["request_count"]["avg"]),
            "errors": int(r.get("error_request_count", {}).get("avg", 0))}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aiperf", required=True, help="path of the aiperf executable")
    p.add_argument("--model", default=None, help="model folder (default: bundled tiny llama)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4, help="requests kept in flight")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--server-cpus", default=None, help="pin the server, e.g. 0 (with --client-cpus)"
    )
    p.add_argument("--client-cpus", default=None, help="pin each client, e.g. 1")
    args = p.parse_args()
    if args.client_cpus:
        CLIENT[:] = ["taskset", "-c", args.client_cpus]
    if args.server_cpus:  # inherited by the server processes started below
        os.sched_setaffinity(0, {int(c) for c in args.server_cpus.split(",")})
    if args.model is None:
        from tandem.tinymodel import default_model_dir

        args.model = str(default_model_dir())
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(args.model, "--served-model-name", "tiny") as url,
    ):
        for i in range(args.rounds):
            for name, run in (("loadgen", run_loadgen), ("aiperf", run_aiperf)):
                before = server_means(url)
                extra = ("tiny",) if name == "aiperf" else ()
                r = run(url, args.model, *extra, args, Path(tmp) / f"{name}{i}")
                r["server"] = server_means(url, before)
                rows.append((name, r))
    print(f"workload: random {args.input_len} in / {args.output_len} out, ignore_eos, "
          f"{args.concurrency} in flight, {args.num_requests} requests per run")  # fmt: skip
    print("client: the client's medians and means; server: the router's own means over the")
    print("same requests (its /metrics histograms' sum / count), a third, client-free reference.")
    print(f"{'client':<10}{'ok':>5}{'err':>5}{'TTFT p50':>10}{'TPOT p50':>10}{'TTFT mean':>11}"
          f"{'server':>8}{'TPOT mean':>11}{'server':>8}   (ms)")  # fmt: skip
    for name, r in rows:
        sv = r["server"]
        print(f"{name:<10}{r['completed']:>5}{r['errors']:>5}{r['ttft_p50']:>10.2f}{r['tpot_p50']:>10.2f}"
              f"{r['ttft_mean']:>11.2f}{sv['ttft']:>8.2f}{r['tpot_mean']:>11.2f}{sv['tpot']:>8.2f}")  # fmt: skip
    for name in ("loadgen", "aiperf"):
        over = statistics.mean(r["ttft_mean"] - r["server"]["ttft"] for n, r in rows if n == name)
        print(f"{name}: mean TTFT minus the server's own: {over:+.2f} ms")
    for key in ("ttft_p50", "tpot_p50"):
        lg = statistics.mean(r[key] for n, r in rows if n == "loadgen")
        ap = statistics.mean(r[key] for n, r in rows if n == "aiperf")
        print(f"{key}: loadgen {lg:.2f} ms, aiperf {ap:.2f} ms, ratio {lg / ap:.3f}")


if __name__ == "__main__":
    main()
