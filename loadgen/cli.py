"""``tandem loadgen`` / ``python -m loadgen``: load an OpenAI-compatible server and report.

Run:      tandem loadgen --url URL [workload] [arrivals] [bounds] [--slo ...] [--out DIR]
Sweep:    tandem loadgen ... --request-rate 1,2,4,8 --out DIR   (one run per rate + sweep.png)
Compare:  tandem loadgen compare DIR_A DIR_B ... [--labels a,b] [--out DIR]  (runs and/or
          sweeps; plots go to ./loadgen-compare by default: see loadgen.compare)

Exit status: 0 when the run finished (errors are counted in the report, not hidden);
1 with ``--fail-on-error`` when any request failed; 2 for bad arguments or an unreachable
server (the message names the flag).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.arrivals import parse_rates
from loadgen.client import Target
from loadgen.compare import compare_main
from loadgen.dataset import SYNTHETIC, DatasetError, load_jobs
from loadgen.metrics import parse_slo, summarize
from loadgen.progress import Progress
from loadgen.report import read_run, render_compare, render_table, write_run
from loadgen.runner import run_load
from loadgen.tokens import PromptTokenizer, TokenizerError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_run_parser(prog: str = "tandem loadgen") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Load an OpenAI-compatible server with streaming requests and report "
        "TTFT, TPOT, ITL, E2E latency (JCT), throughput and goodput (vLLM's definitions). "
        f"`{prog} compare DIR ...` compares runs.",
    )
    g = p.add_argument_group("target")
    g.add_argument(
        "--url", default="http://127.0.0.1:8000", help="server root (default: %(default)s)"
    )
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer/model folder with tokenizer.json, for token counts "
                   "(default: Tandem's bundled model, if built)")  # fmt: skip
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--ignore-eos", action="store_true", help="ask for exactly the output lengths")
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g.add_argument("--timeout", type=_positive_float, default=600.0, help="per request (s)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=SYNTHETIC, default="sharegpt-like")
    w.add_argument("--dataset-path", default=None,
                   help="ShareGPT JSON file or JSONL trace (prompt|prompt_len, output_len, "
                   "[timestamp], [priority]); overrides --workload")  # fmt: skip
    w.add_argument("--input-len", type=_positive_int, default=256, help="random: mean input tokens")
    w.add_argument(
        "--output-len", type=_positive_int, default=128, help="random: mean output tokens"
    )
    w.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths in len*(1±r)")
    w.add_argument("--max-input-len", type=_positive_int, default=1024,
                   help="sharegpt-like/alpaca-like: clip input tokens (default: %(default)s)")  # fmt: skip
    w.add_argument("--max-output-len", type=_positive_int, default=1024,
                   help="sharegpt-like/alpaca-like: clip output tokens (default: %(default)s)")  # fmt: skip
    w.add_argument("--num-prefixes", type=_positive_int, default=4,
                   help="prefix: shared prefixes; chat: conversations (default: %(default)s)")  # fmt: skip
    w.add_argument("--prefix-len", type=int, default=512,
                   help="prefix: tokens per shared prefix; chat: system prompt tokens "
                   "(default: %(default)s)")  # fmt: skip
    w.add_argument("--suffix-len", type=_positive_int, default=64,
                   help="prefix: tokens after the prefix; chat: new user tokens per turn "
                   "(default: %(default)s); outputs are --output-len")  # fmt: skip
    w.add_argument("--turns", type=_positive_int, default=4,
                   help="chat: turns per conversation, each resending the history "
                   "(default: %(default)s)")  # fmt: skip
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("arrivals and bounds")
    a.add_argument("--request-rate", default=None,
                   help="req/s: a number, inf (all at once), or a sweep 1,2,4,8 "
                   "(default: inf, or the trace's timestamps)")  # fmt: skip
    a.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape of the gaps: 1 Poisson, <1 burstier (default: 1)")  # fmt: skip
    a.add_argument("--max-concurrency", type=_positive_int, default=None)
    a.add_argument("--num-requests", type=_positive_int, default=None,
                   help="requests per run (default: 100, or the whole trace)")  # fmt: skip
    a.add_argument("--duration", type=_positive_float, default=None,
                   help="stop sending after this many seconds")  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument("--slo", default=None,
                   help="SLO in ms, e.g. ttft:500,tpot:50,e2el:10000: goodput (requests/s "
                   "meeting it) is reported only with one, and drawn on the plots")  # fmt: skip
    o.add_argument("--out", default=None, help="folder for results.json, requests.csv and plots")
    o.add_argument("--label", default=None, help="name of this run in tables and plots")
    o.add_argument("--no-progress", action="store_true", help="no live progress line")
    o.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    return p


def _default_tokenizer() -> Path | None:
    from tandem.tinymodel import default_model_path

    folder = default_model_path()
    return folder if (folder / "tokenizer.json").is_file() else None


def _server_model(url: str) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=10) as r:
        data = json.loads(r.read())
    models = data.get("data") or []
    if not models:
        raise ValueError("the server lists no model")
    return models[0]["id"]


def main(argv: Sequence[str] | None = None, prog: str = "tandem loadgen") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:], prog + " compare")
    parser = build_run_parser(prog)
    args = parser.parse_args(argv)
    try:
        rates = parse_rates(args.request_rate) if args.request_rate else None
    except ValueError as e:
        parser.error(f"--request-rate: {e}")
    try:
        slo = parse_slo(args.slo)
    except ValueError as e:
        parser.error(f"--slo: {e}")
    if not 0.0 <= args.range_ratio < 1.0:
        parser.error(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as e:
            parser.error(f"--extra-body: not JSON ({e})")
        if not isinstance(extra, dict):
            parser.error("--extra-body must be a JSON object")
    tok_path = args.tokenizer or _default_tokenizer()
    tok: PromptTokenizer | None = None
    if tok_path is not None:
        try:
            tok = PromptTokenizer(tok_path)
        except TokenizerError as e:
            parser.error(f"--tokenizer: {e}")
    url = args.url.rstrip("/")
    try:
        model = args.model or _server_model(url)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot reach --url {url}: {e}", file=sys.stderr)
        return 2
    if tok is None:  # no local tokenizer: the server's /tokenize and /detokenize
        from loadgen.remote_tokenizer import RemoteTokenizer

        try:
            tok = RemoteTokenizer(url, model)
        except TokenizerError as e:
            print(f"error: no --tokenizer given and {e}", file=sys.stderr)
            return 2
        tok_path = f"{url}/tokenize"
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 100
    try:
        jobs = load_jobs(
            tok,
            workload=args.workload,
            num_requests=num_requests or 1000,
            seed=args.seed,
            dataset_path=args.dataset_path,
            input_len=args.input_len,
            output_len=args.output_len,
            range_ratio=args.range_ratio,
            max_input_len=args.max_input_len,
            max_output_len=args.max_output_len,
            num_prefixes=args.num_prefixes,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            turns=args.turns,
        )
    except DatasetError as e:
        parser.error(str(e))
    is_trace = args.dataset_path is not None and args.dataset_path.endswith(".jsonl")
    use_timestamps = rates is None and is_trace and all(j.timestamp is not None for j in jobs)
    if is_trace and args.num_requests is None and args.duration is None:
        num_requests = len(jobs)
    if args.workload == "chat" and args.num_requests is None and args.duration is None:
        num_requests = len(jobs)  # every turn of every conversation
    target = Target(
        url, model, args.endpoint, args.temperature, args.ignore_eos, extra, args.timeout
    )
    config = dict(vars(args))
    config.update(model=model, tokenizer=str(tok_path), use_trace_timestamps=use_timestamps)
    out = Path(args.out) if args.out else None
    label = args.label or (out.name if out else "run")
    any_errors = False
    sweep: list[tuple[float, dict[str, Any]]] = []
    for rate in rates or [math.inf]:
        run_out = out / f"rate-{rate:g}" if out and rates and len(rates) > 1 else out
        progress = Progress(
            num_requests, label=f"rate {rate:g}: " if len(rates or []) > 1 else "",
            enabled=not args.no_progress,
        )  # fmt: skip
        try:
            records, duration = asyncio.run(
                run_load(
                    target,
                    jobs,
                    rate=rate,
                    burstiness=args.burstiness,
                    seed=args.seed,
                    num_requests=num_requests,
                    duration_s=args.duration,
                    max_concurrency=args.max_concurrency,
                    use_timestamps=use_timestamps,
                    tok=tok,
                    progress=progress,
                )
            )
        except ValueError as e:
            parser.error(str(e))
        progress.close()
        summary = summarize(records, duration, slo)
        summary["request_rate"] = None if math.isinf(rate) else rate
        any_errors |= summary["errors"] > 0
        title = f"{label} @ {rate:g} req/s" if rates else label
        print(render_table(summary, title), flush=True)
        if run_out is not None:
            write_run(run_out, summary, records, {**config, "request_rate": rate})
            _plot_run(run_out, label)
        sweep.append((rate, summary))
    if out is not None and len(sweep) > 1:
        (out / "sweep.json").write_text(
            json.dumps({"label": label, "points": [s for _, s in sweep]}, indent=2) + "\n"
        )
        from loadgen.plots import plot_sweep

        plot_sweep({label: sweep}, out / "sweep.png")
        print(render_compare({f"{r:g} req/s": s for r, s in sweep}))
    if out is not None:
        print(f"wrote {out}/", file=sys.stderr)
    return 1 if args.fail_on_error and any_errors else 0


def _plot_run(folder: Path, label: str) -> None:
    from loadgen.plots import plot_cdfs, plot_timeline

    _, rows = read_run(folder)
    plot_cdfs({label: rows}, folder / "cdf.png")
    plot_timeline({label: rows}, folder / "timeline.png")
