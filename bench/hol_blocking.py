"""Head-of-line blocking on the real engine: JCT of short requests stuck behind long ones.

Four long requests (``--long-tokens`` outputs) are submitted before sixteen short ones
(``--short-tokens``), all at t=0, into one engine with batch size 4 (the FastServe
setting). For each policy, in one process, one after another on the same weights:
mean and max JCT of the short requests, mean JCT of the long ones, makespan. JCT is
wall time from submission to the last token.

    python bench/hol_blocking.py                     # bundled tiny model, CPU
    python bench/hol_blocking.py --policies fcfs,mlfq,alise --long-tokens 1000
"""

from __future__ import annotations

import argparse
import statistics
import time


def run(
    model_dir: str | None, policy: str, long_tokens: int, short_tokens: int, max_seqs: int
) -> dict[str, float]:
    from tandem import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        policy=policy,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=256,
        kv_blocks=2048,
    )
    engine = llm.engine
    t0 = time.perf_counter()
    for i in range(4):
        engine.add_request(
            [10 + i] * 8,
            SamplingParams(temperature=0.0, max_tokens=long_tokens, ignore_eos=True),
            f"long{i}",
        )
    for i in range(16):
        engine.add_request(
            [100 + i] * 8,
            SamplingParams(temperature=0.0, max_tokens=short_tokens, ignore_eos=True),
            f"short{i}",
        )
    jct: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                jct[out.request_id] = time.perf_counter() - t0
    short = [v for k, v in jct.items() if k.startswith("short")]
    long_ = [v for k, v in jct.items() if k.startswith("long")]
    return {
        "short_mean": statistics.mean(short),
        "short_max": max(short),
        "long_mean": statistics.mean(long_),
        "makespan": max(jct.values()),
        "finished": len(jct),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--policies", default="fcfs,mlfq,alise")
    ap.add_argument("--long-tokens", type=int, default=1000)
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    args = ap.parse_args()
    results = {
        p: run(args.model, p, args.long_tokens, args.short_tokens, args.max_num_seqs)
        for p in args.policies.split(",")
    }
    base = results.get("fcfs")
    print(
        f"4 long ({args.long_tokens} tokens) submitted before 16 short ({args.short_tokens} tokens), batch size {args.max_num_seqs}"
    )
    print(
        f"{'policy':<8}{'short mean JCT s':>18}{'short max s':>13}{'long mean s':>13}{'makespan s':>12}{'short mean vs fcfs':>20}"
    )
    for name, r in results.items():
        ratio = f"{r['short_mean'] / base['short_mean']:.3f}" if base else "-"
        print(
            f"{name:<8}{r['short_mean']:>18.3f}{r['short_max']:>13.3f}{r['long_mean']:>13.3f}{r['makespan']:>12.3f}{ratio:>20}"
        )


if __name__ == "__main__":
    main()
