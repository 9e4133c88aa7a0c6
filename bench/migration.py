"""Live migration (Llumnix): decode latency under a skewed load, rebalancer on vs off.

`tandem serve --prefill-workers 1 --decode-workers 2 --dispatch round-robin` is fed pairs
of requests, one long output then one short, one pair every `--interval` seconds. The
deterministic round-robin dispatch sends every long request to the same decode worker
(the skew Llumnix targets: output lengths are unknown at dispatch, so a dispatcher
balancing by current load can end up the same way). The same requests run twice:
`--migration off` and `--migration balanced` (the rebalancer moves requests from the
most to the least loaded worker by virtual usage). Reported per variant: TTFT, TPOT and
JCT (mean, p99) over all requests and over the long ones, migrations committed/aborted,
and downtime per migration (the source's stop-and-copy until the destination's DONE),
with off/balanced ratios; written to `bench/results/migration_<device>.json`.

Small on CPU by default (the bundled model); on a GPU pass the model and device, e.g.
`--model DIR --device cuda --serve-args "--dtype bfloat16 --kv-blocks 4096"`.

    python bench/migration.py
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

import aiohttp  # noqa: E402

from loadgen.client import Target, send  # noqa: E402
from loadgen.dataset import Job  # noqa: E402
from loadgen.metrics import stats_ms  # noqa: E402
from tests.e2e.servers import metrics, serve  # noqa: E402

VARIANTS = {"off": ["--migration", "off"], "balanced": ["--migration", "balanced"]}


def jobs(pairs: int, long_out: int, short_out: int) -> list[Job]:
    out = []
    for i in range(pairs):
        out.append(Job(2 * i, f"long request {i}: tell me everything", 8, long_out))
        out.append(Job(2 * i + 1, f"short request {i}", 4, short_out))
    return out


async def run_load(url: str, model: str, todo: list[Job], interval: float) -> list:
    target = Target(url=url, model=model, ignore_eos=True, timeout_s=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        tasks = []
        for i, job in enumerate(todo):
            # One arrival at a time, so round-robin dispatch alternates deterministically.
            await asyncio.sleep(max(0.0, start + (i // 2) * interval + (i % 2) * 0.01
                                    - time.perf_counter()))  # fmt: skip
            tasks.append(asyncio.create_task(send(session, target, job, start, None)))
        return await asyncio.gather(*tasks)


def summarize(records: list, long_out: int, m: dict[str, float]) -> dict:
    ok = [r for r in records if r.ok]
    longs = [r for r in ok if r.requested_output_len == long_out]
    count = m.get("tandem_migration_downtime_seconds_count", 0.0)

    def figures(recs):
        return {
            "ttft_ms": stats_ms(r.ttft for r in recs),
            "tpot_ms": stats_ms(r.tpot for r in recs if r.tpot is not None),
            "jct_ms": stats_ms(r.latency for r in recs),
        }

    return {
        "completed": len(ok),
        "errors": [r.error for r in records if not r.ok],
        "all": figures(ok),
        "long": figures(longs),
        "migrations": {
            k: m.get(f'tandem_router_migrations_total{{outcome="{k}"}}', 0.0)
            for k in ("started", "committed", "aborted")
        },
        "downtime_ms_mean": 1000 * m["tandem_migration_downtime_seconds_sum"] / count
        if count
        else None,
        "migration_ms_mean": 1000 * m["tandem_migration_seconds_sum"] / count if count else None,
        "blocks_per_migration": m["tandem_migration_blocks_sum"] / count if count else None,
        "preemptions": sum(v for k, v in m.items() if k.startswith("tandem_worker_preemptions")),
    }


def table(results: dict) -> str:
    off, on = results["off"], results["balanced"]
    rows = []
    for group in ("all", "long"):
        for metric in ("tpot_ms", "jct_ms", "ttft_ms"):
            for stat in ("mean", "p99"):
                a, b = off[group][metric][stat], on[group][metric][stat]
                ratio = f"{a / b:.2f}x" if a and b else "-"
                rows.append(f"| {group} {metric[:-3]} {stat} ms | {a:.1f} | {b:.1f} | {ratio} |")
    lines = [
        "| figure | migration off | balanced | off / balanced |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += rows
    for key in ("preemptions",):
        lines.append(f"| {key} | {off[key]:.0f} | {on[key]:.0f} | |")
    mig = on["migrations"]
    lines.append(f"| migrations committed / aborted | - | {mig['committed']:.0f} / "
                 f"{mig['aborted']:.0f} | |")  # fmt: skip
    for key, label in (("downtime_ms_mean", "downtime per migration, mean ms"),
                       ("migration_ms_mean", "migration time, mean ms"),
                       ("blocks_per_migration", "KV blocks per migration, mean")):  # fmt: skip
        v = on[key]
        lines.append(f"| {label} | - | {'-' if v is None else f'{v:.2f}'} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: bundled tiny llama)")
    p.add_argument("--device", default="cpu", help="worker device; names the result file")
    p.add_argument("--serve-args", default="", help="extra `tandem serve` flags (both variants)")
    p.add_argument("--pairs", type=int, default=8, help="long + short request pairs")
    p.add_argument("--long-output", type=int, default=512)
    p.add_argument("--short-output", type=int, default=32)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between two pairs")
    p.add_argument("--kv-blocks", type=int, default=160, help="KV blocks per worker")
    p.add_argument("--out", default=None, help="default: bench/results/migration_DEVICE.json")
    args = p.parse_args(argv)
    if args.model is None:
        from tandem.tinymodel import default_model_dir

        args.model = str(default_model_dir())
    base = ["--prefill-workers", "1", "--decode-workers", "2", "--dispatch", "round-robin",
            "--device", args.device, "--kv-blocks", str(args.kv_blocks),
            "--served-model-name", "bench", *shlex.split(args.serve_args)]  # fmt: skip
    todo = jobs(args.pairs, args.long_output, args.short_output)
    results = {}
    started = time.time()
    for name, flags in VARIANTS.items():
        with serve(args.model, *base, *flags, timeout=600, workers=3) as url:
            records = asyncio.run(run_load(url, "bench", todo, args.interval))
            time.sleep(1.5)  # the workers' stats come each second
            results[name] = summarize(records, args.long_output, metrics(url))
    print(f"migration: {args.pairs} pairs (long {args.long_output}, short {args.short_output} "
          f"tokens), a pair every {args.interval}s, round-robin dispatch, "
          f"{args.kv_blocks} KV blocks per decode worker, model {Path(args.model).name}, "
          f"device {args.device} {args.serve_args}".rstrip())  # fmt: skip
    print(table(results))
    out = Path(args.out or ROOT / "bench" / "results" / f"migration_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "variants": results,
                               "wall_s": time.time() - started}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")
    return 0 if all(not r["errors"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
