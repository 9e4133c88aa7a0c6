"""Decode step time against the memory roofline, Llama-3-8B shapes, random weights.

For each (batch, context) point, one decode iteration of ``batch`` sequences that each
attend ``context`` tokens runs through the real ``ModelRunner.execute`` (CUDA graph,
Triton paged attention, LM head, greedy sampling and the read of the sampled ids), timed
as the median of 20 steps after warm-up. The roofline is the bytes a step must read —
the weights (all but the embedding table, of which ``batch`` rows) plus the K and V of
every context token of every layer — over the device copy bandwidth measured in the same
run. ``ratio = roofline / measured`` (1.0 = at the limit).

Two end-to-end figures per point: ``step`` is one synchronous ``execute`` (launch, then
wait for the ids: the host's input staging is serialised with the device), and
``pipelined`` is the steady-state time per step when step N+1 is launched before step N's
ids are collected, as the engine does with async scheduling (``ModelRunner.launch`` /
``collect``; the scheduler's own Python is not in it). Target (issue 13): >= 0.85 of the
roofline.

When a point's KV does not fit the GPU beside the weights, it runs with fewer layers
(32 → 16 → 8; the ``layers`` column) and its roofline counts those layers, so the ratio
stays comparable.

    PYTHONPATH=. python bench/gpu_decode.py                  # the issue's grid
    PYTHONPATH=. python bench/gpu_decode.py --batches 1,32 --contexts 1024 --eager
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from bench import gpu_common as g
from tandem.request import Request, SamplingParams
from tandem.sched.output import ScheduledChunk, SchedulerOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def decode_batch(batch: int, context: int, block_size: int = 16) -> SchedulerOutput:
    """``batch`` decode chunks at position context-1, each with its own blocks."""
    nb = -(-context // block_size)
    chunks = []
    for i in range(batch):
        req = Request(f"r{i}", [1] * (context - 1), GREEDY, 0.0)
        table = list(range(i * nb, (i + 1) * nb))
        chunks.append(ScheduledChunk(req, [1], context - 1, table, sample=True))
    return SchedulerOutput(chunks=chunks)


def pipelined_step_s(runner, sched: SchedulerOutput, iters: int) -> float:
    """Wall seconds per step with one step always in flight: launch N+1, collect N."""
    runner.collect(runner.launch(sched))
    prev = runner.launch(sched)
    t0 = time.perf_counter()
    for _ in range(iters):
        nxt = runner.launch(sched)
        runner.collect(prev)
        prev = nxt
    runner.collect(prev)
    return (time.perf_counter() - t0) / iters


def time_steps(
    runner, sched: SchedulerOutput, iters: int = 20
) -> tuple[float, float | None, float]:
    """(median step seconds, best-of-``iters`` seconds of the CUDA graph replay alone, or
    None when the batch does not run as a graph, pipelined seconds per step)."""
    step = g.median_step_s(runner, sched, warmup=3, iters=iters)
    pipelined = pipelined_step_s(runner, sched, 2 * iters)
    replay = None
    graphs = runner.graphs
    if graphs is not None and graphs.can_run(sched):
        replay = (
            g.events_ms(graphs.graphs[graphs.bucket_for(len(sched.chunks))].replay, iters) / 1e3
        )
    return step, replay, pipelined


def layers_that_fit(cfg, batch: int, context: int, free_bytes: int) -> int:
    for layers in (cfg.num_layers, 16, 8, 4):
        per_layer_w = g.weight_bytes(cfg, batch) / cfg.num_layers  # rough: fine for fitting
        kv = batch * context * g.kv_bytes_per_token(cfg) / cfg.num_layers * layers
        if per_layer_w * layers + kv + 6 * 2**30 < free_bytes:
            return layers
    raise SystemExit(f"batch {batch} x context {context} does not fit even with 4 layers")


def attention_sweep(cfg, points: list[tuple[int, int]]) -> list[dict]:
    """The decode attention kernel alone, per (BLOCK_N, warps, stages): GB/s of K/V read."""
    from tandem.attention.triton_backend import num_sms
    from tandem.attention.triton_decode import choose_partition, paged_decode

    out = []
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    for b, c in points:
        nb = -(-c // 16)
        cache = torch.randn(2, b * nb, 16, hkv, d, dtype=torch.bfloat16, device="cuda")
        q = torch.randn(b, hq, d, dtype=torch.bfloat16, device="cuda")
        o = torch.empty_like(q)
        tables = torch.arange(b * nb, device="cuda").view(b, nb)
        lens = torch.full((b,), c, dtype=torch.int32, device="cuda")
        qs = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        kv_bytes = 2 * b * c * hkv * d * 2
        for max_len in (max(c, 4096),):  # the CUDA-graph grid
            part = choose_partition(max_len, b, hkv, num_sms(q.device))
            splits = -(-max_len // part)
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2):
                        run = functools.partial(
                            paged_decode, q, cache[0], cache[1], tables, lens, qs, qs[:b], o,
                            0.1, part, splits, None, bn, warps, stages,
                        )  # fmt: skip
                        try:
                            run()
                            ms = g.events_ms(run, 20)
                        except Exception as e:  # resources exceeded for a config
                            print(
                                f"  B={b} ctx={c} bn={bn} w={warps} s={stages}: {type(e).__name__}"
                            )
                            continue
                        out.append(dict(batch=b, context=c, grid_len=max_len, partition=part,
                                        block_n=bn, warps=warps, stages=stages, ms=ms,
                                        GBps=kv_bytes / ms / 1e6))  # fmt: skip
        best = sorted(
            (r for r in out if r["batch"] == b and r["context"] == c), key=lambda r: r["ms"]
        )[:5]
        for r in best:
            print(f"  attn B={b} ctx={c} grid_len={r['grid_len']} part={r['partition']} bn={r['block_n']} "
                  f"w={r['warps']} s={r['stages']}: {r['ms'] * 1e3:.0f} us {r['GBps']:.0f} GB/s")  # fmt: skip
    return out


def profile_point(runner, b: int, c: int) -> None:
    """Eager-mode kernel time per step, by kernel name (top 15)."""
    from torch.profiler import ProfilerActivity, profile

    sched = decode_batch(b, c)
    for _ in range(3):
        runner.execute(sched)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner.execute(sched)
        torch.cuda.synchronize()
    print(f"--- profile B={b} ctx={c} (per step, device time)")
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:15]
    for e in rows:
        print(f"  {e.device_time_total / 5 / 1e3:8.3f} ms  x{e.count // 5:4d}  {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="llama-3-8b", help="a tandem/model_configs name")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--eager", action="store_true", help="also time without CUDA graphs")
    ap.add_argument(
        "--torch-attention", action="store_true", help="also time the torch reference attention"
    )
    ap.add_argument(
        "--sweep-attention", action="store_true", help="time decode attention configs alone"
    )
    ap.add_argument("--profile", default=None, help="B,CTX: eager kernel profile of one point")
    args = ap.parse_args()
    if args.sweep_attention:
        _, cfg = g.model_config(args.model)
        rows = attention_sweep(cfg, [(1, 4096), (32, 1024), (256, 1024), (64, 4096)])
        g.write_result("gpu_decode_attention_sweep", dict(points=rows))
    if args.profile:
        b, c = (int(x) for x in args.profile.split(","))
        runner, _ = g.make_runner(args.model, None, b * -(-c // 16), b, c, cuda_graphs=False)
        profile_point(runner, b, c)
        del runner
        torch.cuda.empty_cache()
    if args.sweep_attention or args.profile:
        return
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]

    bw = g.copy_bandwidth()
    peak = g.matmul_tflops()
    print(f"device {g.device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write), "
          f"bf16 matmul {peak:.0f} TFLOP/s")  # fmt: skip
    _, full = g.model_config(args.model)
    free = torch.cuda.mem_get_info()[0]
    plan: dict[int, list[tuple[int, int]]] = {}
    for b in batches:
        for c in contexts:
            plan.setdefault(layers_that_fit(full, b, c, free), []).append((b, c))

    variants = [("graph+triton", "triton", True)]
    if args.eager:
        variants.append(("eager+triton", "triton", False))
    if args.torch_attention:
        variants.append(("eager+torch", "torch", False))
    rows = []
    for layers, points in sorted(plan.items(), reverse=True):
        max_b = max(b for b, _ in points)
        blocks = max(b * -(-c // 16) for b, c in points)
        for label, attention, graphs in variants:
            runner, cfg = g.make_runner(
                args.model, layers, blocks, max_b, max(contexts),
                attention=attention, cuda_graphs=graphs,
            )  # fmt: skip
            for b, c in points:
                t, replay, piped = time_steps(runner, decode_batch(b, c))
                read = g.weight_bytes(cfg, b) + b * c * g.kv_bytes_per_token(cfg)
                roof = read / bw
                # Compute floor of the projections: at large batch they are not memory-bound.
                flops = b * g.linear_flops_per_token(cfg) + g.attention_flops(cfg, 1, c - 1) * b
                compute = flops / (peak * 1e12)
                rows.append(dict(
                    variant=label, layers=layers, batch=b, context=c, step_ms=t * 1e3,
                    graph_replay_ms=replay * 1e3 if replay else None,
                    pipelined_ms=piped * 1e3, ratio_pipelined=roof / piped,
                    roofline_ms=roof * 1e3, ratio=roof / t, bytes_read=read,
                    compute_floor_ms=compute * 1e3,
                    ratio_to_max_floor=max(roof, compute) / t, tokens_per_s=b / t,
                ))  # fmt: skip
                r = rows[-1]
                print(f"{label:13s} L={layers:2d} B={b:4d} ctx={c:5d}  {r['step_ms']:8.2f} ms  "
                      f"pipelined {r['pipelined_ms']:8.2f} ms  roofline {r['roofline_ms']:8.2f} ms  "
                      f"ratio {r['ratio']:.2f} / {r['ratio_pipelined']:.2f}", flush=True)  # fmt: skip
            del runner
            torch.cuda.empty_cache()
    path = g.write_result("gpu_decode", dict(
        model=args.model, copy_bandwidth_Bps=bw, matmul_tflops=peak, target_ratio=0.85, points=rows,
        min_ratio_graph=min(r["ratio"] for r in rows if r["variant"] == "graph+triton"),
        min_ratio_pipelined=min(r["ratio_pipelined"] for r in rows if r["variant"] == "graph+triton"),
    ))  # fmt: skip
    print("\n| variant | layers | batch | context | step ms | pipelined ms | replay ms "
          "| roofline ms | step ratio | pipelined ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rep = r["graph_replay_ms"]
        print(f"| {r['variant']} | {r['layers']} | {r['batch']} | {r['context']} | "
              f"{r['step_ms']:.2f} | {r['pipelined_ms']:.2f} | {'-' if rep is None else f'{rep:.2f}'} | "
              f"{r['roofline_ms']:.2f} | {r['ratio']:.2f} | {r['ratio_pipelined']:.2f} |")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
