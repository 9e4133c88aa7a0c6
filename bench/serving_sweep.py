"""The seed papers' serving comparisons, reproduced end to end through `tandem loadgen`.

Each scenario starts `tandem serve` once per variant, sweeps the offered load with loadgen
(one run per rate, the same requests for every variant), then prints the comparison and
writes the overlaid plots (`loadgen compare`) and a JSON of every figure.

Scenarios (variants):
  policy    fcfs vs mlfq vs alise (FastServe, ALISE): JCT against load.
  chunked   chunked prefill on vs off (Sarathi-Serve): p99 time between tokens (ITL)
            against load, and capacity under an SLO (the highest rate whose goodput
            keeps >= 90% of the completed requests within --slo).
  disagg    colocated vs disaggregated prefill/decode (one worker each).

Small on CPU with the bundled model (the defaults); full size on a GPU by passing the
model and device through, e.g. --model DIR --serve-args "--device cuda --dtype bfloat16".

    python bench/serving_sweep.py policy
    python bench/serving_sweep.py chunked --smoke      # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.servers import serve  # noqa: E402

SCENARIOS: dict[str, dict[str, list[str]]] = {
    "policy": {"fcfs": ["--policy", "fcfs"], "mlfq": ["--policy", "mlfq"],
               "alise": ["--policy", "alise"]},
    "chunked": {"chunked": [], "no-chunked": ["--no-chunked-prefill"]},
    "disagg": {"colocated": [], "disaggregated": ["--prefill-workers", "1", "--decode-workers", "1"]},
}  # fmt: skip
HEADLINE = {
    "policy": [("e2el_ms", "mean"), ("e2el_ms", "p99"), ("ttft_ms", "p50")],
    "chunked": [("itl_ms", "p99"), ("ttft_ms", "p99"), ("e2el_ms", "mean")],
    "disagg": [("ttft_ms", "p50"), ("tpot_ms", "p50"), ("e2el_ms", "mean")],
}


def capacity(points: list[dict], min_good: float = 0.9) -> float | None:
    """Highest offered rate at which >= ``min_good`` of all requests met the SLO."""
    ok = [p["request_rate"] for p in points if p["request_rate"] is not None
          and p["total_requests"] and p["goodput_requests"] / p["total_requests"] >= min_good]  # fmt: skip
    return max(ok) if ok else None


def _points(folder: Path) -> list[dict]:
    """A loadgen --out folder's summaries: one per rate of a sweep, or the single run."""
    if (folder / "sweep.json").is_file():
        return json.loads((folder / "sweep.json").read_text())["points"]
    return [json.loads((folder / "results.json").read_text())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--model", default=None, help="model folder (default: bundled tiny llama)")
    p.add_argument("--serve-args", default="", help="extra `tandem serve` flags for every variant")
    p.add_argument("--rates", default="4,8,16", help="offered loads, req/s")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--workload", default="sharegpt-like")
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--slo", default="ttft:500,tpot:30", help="for goodput and capacity (ms)")
    p.add_argument("--out", default=None, help="default: bench/results/serving_sweep_SCENARIO")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rates, args.num_requests, args.max_output_len = "10", 8, 16
    if args.model is None:
        from tandem.tinymodel import default_model_dir

        args.model = str(default_model_dir())
    out = Path(args.out or ROOT / "bench" / "results" / f"serving_sweep_{args.scenario}")
    variants = SCENARIOS[args.scenario]
    started = time.time()
    for name, flags in variants.items():
        with serve(args.model, *flags, *shlex.split(args.serve_args)) as url:
            subprocess.run(
                [sys.executable, "-m", "loadgen", "--url", url, "--tokenizer", args.model,
                 "--workload", args.workload, "--max-input-len", str(args.max_input_len),
                 "--max-output-len", str(args.max_output_len), "--ignore-eos",
                 "--request-rate", args.rates,
                 "--num-requests", str(args.num_requests), "--burstiness", str(args.burstiness),
                 "--slo", args.slo, "--seed", "0", "--no-progress", "--label", name,
                 "--out", str(out / name)],
                check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
            )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "loadgen", "compare", *(str(out / n) for n in variants),
         "--labels", ",".join(variants), "--out", str(out)],
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    sweeps = {n: _points(out / n) for n in variants}
    rates = [pt["request_rate"] for pt in next(iter(sweeps.values()))]
    cols = HEADLINE[args.scenario]
    print(f"scenario {args.scenario}: {args.workload}, {args.num_requests} requests per rate, "
          f"SLO {args.slo} ms, model {Path(args.model).name} {args.serve_args}".rstrip())  # fmt: skip
    header = f"{'rate':>6} {'variant':<14}" + "".join(
        f"{k[:-3] + ' ' + s + ' ms':>16}" for k, s in cols
    )
    print(header + f"{'goodput':>10}{'errors':>8}")
    figures = {}
    for i, rate in enumerate(rates):
        for name in variants:
            pt = sweeps[name][i]
            cells = "".join(f"{pt[k][s] or float('nan'):>16.1f}" for k, s in cols)
            label = "inf" if rate is None else f"{rate:g}"
            print(f"{label:>6} {name:<14}{cells}{pt['goodput']:>10.2f}{pt['errors']:>8}")
            figures.setdefault(name, []).append(
                {"request_rate": rate, **{f"{k}_{s}": pt[k][s] for k, s in cols},
                 "goodput": pt["goodput"], "completed": pt["completed"], "errors": pt["errors"]}
            )  # fmt: skip
    caps = {n: capacity(sweeps[n]) for n in variants}
    print("capacity under the SLO (req/s): " + ", ".join(f"{n} {c}" for n, c in caps.items()))
    first = next(iter(variants))
    for name in list(variants)[1:]:
        ratios = []
        for i, rate in enumerate(rates):
            k, s = cols[0]
            a, b = sweeps[first][i][k][s], sweeps[name][i][k][s]
            if a and b:
                ratios.append(f"{'inf' if rate is None else f'{rate:g}'}: {a / b:.2f}x")
        print(f"{cols[0][0][:-3]} {cols[0][1]} {first} / {name}: " + ", ".join(ratios))
    result = {"scenario": args.scenario, "args": vars(args), "variants": figures,
              "capacity_req_s": caps, "wall_s": time.time() - started}  # fmt: skip
    (out / f"serving_sweep_{args.scenario}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"plots: {out}/sweep.png; per-run folders under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
