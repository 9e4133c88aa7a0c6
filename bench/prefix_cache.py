"""Prefix caching on vs off, end to end through HTTP (issue 14).

For each workload, `tandem serve` runs twice with the same flags except
``--no-prefix-caching``, and loadgen sends both the same requests at the same offered
load (streamed /v1/completions, outputs fixed with ``ignore_eos``). Reported per variant:
TTFT p50 / p99, E2E mean, output and request throughput, and the prefix-cache hit rate
the workers report in /metrics; then the off / on ratios.

Workloads (``loadgen.shared_prefix``):
  chat    multi-turn conversations: every turn resends the history (system prompt,
          earlier turns and the server's real answers) plus new user text, sent once the
          previous turn ended.
  prefix  a few long shared system prompts, each request its own short suffix.

CPU (the defaults: the bundled tiny model):
    python bench/prefix_cache.py
GPU (full-size shapes with random weights):
    python bench/prefix_cache.py --model random:llama-3-8b --device cuda \
        --serve-args "--dtype bfloat16" --rate 8 --conversations 64 --system-len 2048
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen.client import Target  # noqa: E402
from loadgen.dataset import load_jobs  # noqa: E402
from loadgen.metrics import summarize  # noqa: E402
from loadgen.runner import run_load  # noqa: E402
from loadgen.tokens import PromptTokenizer  # noqa: E402
from tests.e2e.servers import metrics, serve  # noqa: E402

VARIANTS = {"caching on": [], "caching off": ["--no-prefix-caching"]}


def _model_name(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def _hit_rate(url: str, queries: int, timeout: float = 10.0) -> dict[str, float]:
    """The workers' prefix-cache figures, once their stats count every request."""
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        seen = sum(v for k, v in m.items() if k.startswith("tandem_worker_prefix_cache_queries"))
        if seen >= queries or time.time() > deadline:
            return {
                "token_hit_rate": m.get("tandem_prefix_cache_hit_rate", 0.0),
                "request_hit_rate": m.get("tandem_prefix_cache_request_hit_rate", 0.0),
            }
        time.sleep(0.3)


def run_variant(model: str, flags: list[str], jobs, tok, args) -> dict:
    with serve(model, "--device", args.device, *shlex.split(args.serve_args), *flags,
               timeout=args.start_timeout) as url:  # fmt: skip
        target = Target(url, _model_name(url), ignore_eos=True, timeout_s=args.timeout)
        records, duration = asyncio.run(
            run_load(
                target,
                jobs,
                rate=args.rate,
                seed=0,
                num_requests=len(jobs),
                max_concurrency=args.max_concurrency,
                tok=tok,
            )  # fmt: skip
        )
        summary = summarize(records, duration, {})
        summary["prefix_cache"] = _hit_rate(url, summary["completed"])
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model folder or random:NAME (default: the bundled tiny llama)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--serve-args", default="", help="extra `tandem serve` flags (both variants)")
    p.add_argument("--workloads", default="chat,prefix")
    p.add_argument("--rate", type=float, default=4.0, help="offered load, req/s (default: 4)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--output-len", type=int, default=16, help="output tokens per request")
    p.add_argument("--conversations", type=int, default=12, help="chat: conversations")
    p.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    p.add_argument("--system-len", type=int, default=512, help="chat: system prompt tokens")
    p.add_argument("--user-len", type=int, default=48, help="chat: new user tokens per turn")
    p.add_argument("--num-prefixes", type=int, default=4, help="prefix: shared prefixes")
    p.add_argument("--prefix-len", type=int, default=1024, help="prefix: tokens per prefix")
    p.add_argument("--suffix-len", type=int, default=32, help="prefix: tokens after it")
    p.add_argument("--num-requests", type=int, default=48, help="prefix: requests")
    p.add_argument("--timeout", type=float, default=600.0, help="per request (s)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="server start-up (s)")
    p.add_argument("--out", default=None, help="JSON of every figure (default: bench/results)")
    args = p.parse_args(argv)
    from tandem.random_model import resolve_model

    if args.model is None:
        from tandem.tinymodel import default_model_dir

        args.model = str(default_model_dir())
    tok = PromptTokenizer(resolve_model(args.model))
    out = Path(args.out or ROOT / "bench" / "results" / "prefix_cache.json")
    results: dict = {"args": vars(args), "workloads": {}}
    for workload in args.workloads.split(","):
        if workload == "chat":
            jobs = load_jobs(tok, workload="chat", num_requests=1, seed=0,
                             num_prefixes=args.conversations, prefix_len=args.system_len,
                             suffix_len=args.user_len, output_len=args.output_len,
                             turns=args.turns)  # fmt: skip
            what = (f"{args.conversations} conversations x {args.turns} turns, system "
                    f"{args.system_len} + {args.user_len} user tokens per turn")  # fmt: skip
        else:
            jobs = load_jobs(tok, workload="prefix", num_requests=args.num_requests, seed=0,
                             num_prefixes=args.num_prefixes, prefix_len=args.prefix_len,
                             suffix_len=args.suffix_len, output_len=args.output_len)  # fmt: skip
            what = (f"{args.num_requests} requests over {args.num_prefixes} prefixes of "
                    f"{args.prefix_len} tokens + {args.suffix_len}")  # fmt: skip
        rows = {name: run_variant(args.model, flags, jobs, tok, args)
                for name, flags in VARIANTS.items()}  # fmt: skip
        results["workloads"][workload] = rows
        print(f"\n{workload}: {what}, {args.output_len} output tokens, {args.rate:g} req/s, "
              f"model {Path(args.model).name} on {args.device} {args.serve_args}".rstrip())  # fmt: skip
        print(f"{'variant':<13}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'E2E mean ms':>13}"
              f"{'out tok/s':>11}{'req/s':>8}{'tok hit':>9}{'req hit':>9}{'errors':>8}")  # fmt: skip
        for name, s in rows.items():
            pc = s["prefix_cache"]
            print(f"{name:<13}{s['ttft_ms']['p50']:>13.1f}{s['ttft_ms']['p99']:>13.1f}"
                  f"{s['e2el_ms']['mean']:>13.1f}{s['output_throughput']:>11.1f}"
                  f"{s['request_throughput']:>8.2f}{pc['token_hit_rate']:>9.1%}"
                  f"{pc['request_hit_rate']:>9.1%}{s['errors']:>8}")  # fmt: skip
        on, off = rows["caching on"], rows["caching off"]
        ratios = {
            "ttft_p50": off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"],
            "ttft_p99": off["ttft_ms"]["p99"] / on["ttft_ms"]["p99"],
            "output_throughput": on["output_throughput"] / off["output_throughput"],
        }
        results["workloads"][workload]["ratios"] = ratios
        print(f"off / on: TTFT p50 {ratios['ttft_p50']:.2f}x, TTFT p99 {ratios['ttft_p99']:.2f}x;"
              f" throughput on / off {ratios['output_throughput']:.2f}x")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
