"""Discrete-event simulation of one serving instance: JCT of fcfs, mlfq, alise under load.

It drives the very same ``Scheduler`` and policy classes the engine uses, with a fake
runner and a simulated clock: each iteration advances time by the cost model's estimate
for that batch (prefill chunks + decodes + context). Nothing else is simulated: batching,
the token budget, chunking, KV blocks and preemption are the real code.

Load: the instance's capacity (requests/s) is measured first by a saturation run (all
requests at t=0, fcfs); each load level is that fraction of it, as Poisson arrivals.

Cost model (default): a Llama-3-8B-class model on one H100-class GPU, from first
principles — decode: 8 ms of weight reads + 0.05 ms per sequence + 64 ns per context token
of KV (128 KiB/token at ~2 TB/s); prefill: 32 µs per token (16 GFLOP/token at ~500 TFLOP/s).
Pass ``--cost-model FILE`` for a profiled one: the JSON that ``tandem profile-cost-model
FILE`` writes and ``tandem serve --cost-model FILE`` reads (``CostModel.save`` format).

KV memory: ``--kv-blocks`` device blocks of 16 tokens; a request that does not fit is
preempted by the real scheduler — by recompute (its prefill runs again, charged by the
cost model like any prefill) or, with ``--host-kv-blocks``, by swap to the host tier. A
swap-out or swap-in that the iteration waits for costs ``blocks · 16 · --kv-bytes-per-token
/ --swap-gbps`` on the clock; proactive offload and prefetch overlap the forward pass
(side stream) and cost nothing here.

Regimes (``--regime``, each sets defaults that explicit flags override):
- ``batch-bound``: 16,384 KV blocks (256k tokens), batch 64: the batch size limits.
- ``memory-bound``: 1,024 KV blocks (16k tokens) and a 16,384-block host tier with swap
  preemption: KV memory limits, preemption costs PCIe time.
- ``long-prompt``: prompts 8× longer (ShareGPT-like: mean ~1.3k tokens, cut at 8,192):
  prefill dominates and skip-join matters.

Arrivals: ``--burstiness`` is the gamma shape of the gaps (1 = Poisson, 0.25 = bursty).
``--json FILE`` writes every run's numbers with the command line.

    python bench/sched_sim.py                                  # 10,000 requests, both workloads
    python bench/sched_sim.py --num-requests 2000 --loads 0.5,0.9 --workloads alpaca-like
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from loadgen.workloads import poisson_arrivals, sample_requests
from tandem.config import CacheConfig, SchedulerConfig
from tandem.request import Request, SamplingParams
from tandem.sched.cost_model import CostModel
from tandem.sched.output import RunnerOutput
from tandem.sched.policy import SchedulingPolicy, make_policy
from tandem.sched.scheduler import Scheduler

H100_LLAMA3_8B = CostModel(
    prefill_base=2e-3,
    prefill_per_token=3.2e-5,
    prefill_per_token_sq=2e-10,
    decode_base=8e-3,
    decode_per_seq=5e-5,
    decode_per_ctx_token=6.4e-8,
)

REGIMES = {
    "batch-bound": {"max_num_seqs": 64, "kv_blocks": 16384, "host_kv_blocks": 0, "prompt_scale": 1},
    "memory-bound": {
        "max_num_seqs": 64, "kv_blocks": 1024, "host_kv_blocks": 16384, "prompt_scale": 1,
    },
    "long-prompt": {"max_num_seqs": 64, "kv_blocks": 16384, "host_kv_blocks": 0, "prompt_scale": 8},
}  # fmt: skip

VARIANTS = {
    "fcfs": ("fcfs", {}),
    "mlfq-noskip": ("mlfq", {"skip_join": False}),
    "mlfq": ("mlfq", {"skip_join": True}),
    "mlfq-fastserve": ("mlfq", {"skip_join": True, "order": "fastserve"}),
    "alise": ("alise", {}),
    "srpt-oracle": ("oracle", {}),
}


class OracleSRPT(SchedulingPolicy):
    """Reference only (not a Tandem policy): knows every request's true output length and
    runs the shortest remaining first. Bounds what any length predictor could achieve."""

    name = "srpt-oracle"

    def sort_key(self, request: Request, now: float) -> tuple:
        left = request.sampling_params.max_tokens - request.num_output_tokens
        return (request.priority, left, request.arrival_time)


def simulate(args: tuple) -> dict:
    variant, workload, load_name, arrivals, reqs, cost, opts = args
    policy_name, extra = VARIANTS[variant]
    clock = [0.0]
    sched_cfg = SchedulerConfig(
        max_num_seqs=opts["max_num_seqs"],
        max_num_batched_tokens=opts["budget"],
        policy="fcfs" if policy_name == "oracle" else policy_name,
        starvation_limit=opts["starvation_limit"],
        preemption_mode="swap" if opts["host_kv_blocks"] else "recompute",
    )
    if policy_name == "oracle":
        policy = OracleSRPT()
    else:
        policy = make_policy(
            policy_name, cost_model=cost, starvation_limit=opts["starvation_limit"], **extra
        )
    sched = Scheduler(
        sched_cfg,
        CacheConfig(
            block_size=16, num_blocks=opts["kv_blocks"], num_host_blocks=opts["host_kv_blocks"]
        ),
        policy=policy,
        clock=lambda: clock[0],
        cost_model=cost,
    )
    arrival_of: dict[str, float] = {}
    jct: list[float] = []
    finish_times: list[float] = []
    i, n = 0, len(reqs)
    iterations = 0
    swap_blocks = 0
    while i < n or sched.requests:
        while i < n and arrivals[i] <= clock[0]:
            r = reqs[i]
            rid = f"r{i}"
            sched.add_request(
                Request(
                    rid,
                    r.prompt_token_ids,
                    SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                    float(arrivals[i]),
                )
            )
            arrival_of[rid] = float(arrivals[i])
            i += 1
        if not sched.requests:
            clock[0] = float(arrivals[i])
            continue
        out = sched.schedule()
        if not out.chunks:
            if out.swap_out or out.swap_in or out.offload or out.prefetch:
                clock[0] += (
                    sum(len(c.src) for c in (*out.swap_out, *out.swap_in))
                    * opts["swap_s_per_block"]
                    + 1e-4
                )
                sched.update_from_output(out, RunnerOutput(sampled={}), seconds=1e-4)
                continue
            if i < n:
                clock[0] = max(clock[0], float(arrivals[i]))
                continue
            raise RuntimeError("simulation stalled")
        prefill = [c.num_tokens for c in out.chunks if c.num_tokens > 1]
        decodes = sum(1 for c in out.chunks if c.num_tokens == 1)
        context = sum(c.start_pos + c.num_tokens for c in out.chunks)
        dt = cost.iteration_time(prefill, decodes, context)
        swapped = sum(len(c.src) for c in (*out.swap_out, *out.swap_in))
        dt += swapped * opts["swap_s_per_block"]
        swap_blocks += swapped
        clock[0] += dt
        runner_out = RunnerOutput(sampled={c.request.request_id: 7 for c in out.chunks if c.sample})
        for ev in sched.update_from_output(out, runner_out, seconds=dt):
            if ev.finished:
                jct.append(clock[0] - arrival_of[ev.request.request_id])
                finish_times.append(clock[0])
        iterations += 1
    arr = np.array(jct)
    return {
        "variant": variant,
        "workload": workload,
        "load": load_name,
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p99": float(np.percentile(arr, 99)),
        "makespan": clock[0],
        "iterations": iterations,
        "preemptions": sched.num_preemptions,
        "swap_blocks": swap_blocks,
        "completed": len(jct),
        "finish_times": finish_times,
    }


def capacity(workload_reqs, cost, opts) -> float:
    """Requests/s the instance sustains: a saturation run (1,000 requests at t=0, fcfs).

    1,000 keeps the batch full for the whole measured window; more only costs time
    (every iteration sorts all waiting requests)."""
    subset = workload_reqs[:1000]
    zeros = np.zeros(len(subset))
    r = simulate(("fcfs", "cap", "cap", zeros, subset, cost, opts))
    # Steady state only: the drain at the end (a few long requests alone) is not capacity.
    t = sorted(r["finish_times"])
    lo, hi = len(t) // 10, (9 * len(t)) // 10
    return (hi - lo) / (t[hi] - t[lo])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-requests", type=int, default=10000)
    ap.add_argument("--workloads", default="sharegpt-like,alpaca-like")
    ap.add_argument("--loads", default="0.5,0.7,0.8,0.9,0.95")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--regime", choices=sorted(REGIMES), default="batch-bound")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--budget", type=int, default=2048, help="token budget per iteration")
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument("--host-kv-blocks", type=int, default=None, help="host tier (swap preemption)")
    ap.add_argument("--prompt-scale", type=int, default=None, help="prompt length multiplier")
    ap.add_argument("--swap-gbps", type=float, default=25.0, help="host<->device GB/s")
    ap.add_argument(
        "--kv-bytes-per-token", type=int, default=131072, help="KV bytes/token (Llama-3-8B bf16)"
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--starvation-limit", type=float, default=60.0)
    ap.add_argument(
        "--cost-model", default=None, help="JSON CostModel file (default: H100-class Llama-3-8B)"
    )
    ap.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival gaps (1 = Poisson, <1 burstier)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, default=None)
    ap.add_argument("--plot", default="bench/sched_sim.png")
    args = ap.parse_args()
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    cost = CostModel.load(args.cost_model) if args.cost_model else H100_LLAMA3_8B
    regime = REGIMES[args.regime]
    for key, value in regime.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    opts = {
        "max_num_seqs": args.max_num_seqs,
        "budget": args.budget,
        "kv_blocks": args.kv_blocks,
        "host_kv_blocks": args.host_kv_blocks,
        "starvation_limit": args.starvation_limit,
        "swap_s_per_block": 16 * args.kv_bytes_per_token / (args.swap_gbps * 1e9),
    }
    loads = [float(x) for x in args.loads.split(",")]
    jobs = []
    started = time.perf_counter()
    caps = {}
    for w in args.workloads.split(","):
        reqs = sample_requests(w, args.num_requests, seed=args.seed)
        if args.prompt_scale > 1:
            reqs = [
                dataclasses.replace(
                    r, prompt_token_ids=(r.prompt_token_ids * args.prompt_scale)[:8192]
                )
                for r in reqs
            ]
        caps[w] = capacity(reqs, cost, opts)
        for load in loads:
            arrivals = poisson_arrivals(
                len(reqs), load * caps[w], seed=args.seed, burstiness=args.burstiness
            )
            for v in args.variants.split(","):
                jobs.append((v, w, load, arrivals, reqs, cost, opts))
    with mp.get_context("fork").Pool(args.processes) as pool:
        results = pool.map(simulate, jobs)
    print(
        f"{args.num_requests} requests per run; batch {args.max_num_seqs}, budget {args.budget}, "
        f"{args.kv_blocks} KV blocks of 16 (host {args.host_kv_blocks}), regime {args.regime}, burstiness {args.burstiness}; wall {time.perf_counter() - started:.0f}s"
    )
    for w, cap in caps.items():
        print(f"capacity {w}: {cap:.2f} req/s")
    print(
        f"{'workload':<15}{'load':>6}{'variant':>13}{'mean JCT s':>12}{'p99 JCT s':>11}{'mean vs fcfs':>14}{'p99 vs fcfs':>13}{'preempt':>9}"
    )
    by_key = {(r["workload"], r["load"], r["variant"]): r for r in results}
    for r in results:
        base = by_key.get((r["workload"], r["load"], "fcfs"))
        mean_ratio = base["mean"] / r["mean"] if base else float("nan")
        p99_ratio = base["p99"] / r["p99"] if base else float("nan")
        print(
            f"{r['workload']:<15}{r['load']:>6.2f}{r['variant']:>13}{r['mean']:>12.2f}{r['p99']:>11.2f}"
            f"{mean_ratio:>13.2f}x{p99_ratio:>12.2f}x{r['preemptions']:>9}"
        )
    if args.json:
        record = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "regime": args.regime,
            "options": {**opts, "burstiness": args.burstiness, "prompt_scale": args.prompt_scale},
            "cost_model": dataclasses.asdict(cost),
            "capacity_req_s": caps,
            "runs": [{k: v for k, v in r.items() if k != "finish_times"} for r in results],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"json: {args.json}")
    if args.plot:
        plot(results, args.workloads.split(","), loads, args.variants.split(","), Path(args.plot))
        print(f"plot: {args.plot}")


def plot(results, workloads, loads, variants, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for col, w in enumerate(workloads):
        for row, metric in enumerate(("mean", "p99")):
            ax = axes[row][col]
            for v in variants:
                ys = [
                    next(
                        r[metric]
                        for r in results
                        if r["workload"] == w and r["load"] == x and r["variant"] == v
                    )
                    for x in loads
                ]
                ax.plot(loads, ys, marker="o", label=v)
            ax.set_title(f"{w}: {metric} JCT")
            ax.set_xlabel("load (fraction of measured capacity)")
            ax.set_ylabel("seconds")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
