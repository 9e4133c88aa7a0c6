"""Prefill against the bf16 matrix-product rate: model FLOPs utilisation (MFU).

One prompt of L tokens (512 .. 8k) in one chunk through ``ModelRunner.execute`` (Triton
chunked-prefill attention over paged KV, cuBLAS projections, LM head for the last token,
sampling), median of 5 after warm-up. Model FLOPs: 2 x the multiplied parameters per
token (the LM head for one token only) plus causal attention (QK^T and PV over
L(L+1)/2 pairs per head and layer). ``MFU = FLOPs / time / peak`` where the peak is bf16
8192^3 matrix products measured in the same run.

    PYTHONPATH=. python bench/gpu_prefill.py
"""

from __future__ import annotations

import argparse

import torch

from bench import gpu_common as g
from tandem.request import Request, SamplingParams
from tandem.sched.output import ScheduledChunk, SchedulerOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def prefill(n: int, seqs: int = 1) -> SchedulerOutput:
    nb = -(-n // 16)
    chunks = []
    for i in range(seqs):
        ids = [(7 * j + i) % 1000 + 10 for j in range(n)]
        req = Request(f"p{i}", ids, GREEDY, 0.0)
        chunks.append(ScheduledChunk(req, ids, 0, list(range(i * nb, (i + 1) * nb)), sample=True))
    return SchedulerOutput(chunks=chunks)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument(
        "--torch-attention", action="store_true", help="also time the torch reference attention"
    )
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    peak = g.matmul_tflops()
    print(f"device {g.device_name()}: bf16 matmul {peak:.0f} TFLOP/s")
    variants = ["triton"] + (["torch"] if args.torch_attention else [])
    rows = []
    for attention in variants:
        runner, cfg = g.make_runner(
            args.model, None, -(-max(lengths) // 16) + 16, 8, max(lengths),
            max_batched_tokens=max(lengths), attention=attention, cuda_graphs=False,
        )  # fmt: skip
        head = 2 * cfg.vocab_size * cfg.hidden_size
        for n in lengths:
            sched = prefill(n)
            t = g.median_step_s(runner, sched, warmup=2, iters=5)
            flops = n * (g.linear_flops_per_token(cfg) - head) + head + g.attention_flops(cfg, n)
            mfu = flops / t / (peak * 1e12)
            rows.append(dict(attention=attention, tokens=n, ms=t * 1e3, tflops=flops / t / 1e12,
                             mfu=mfu, attention_share=g.attention_flops(cfg, n) / flops))  # fmt: skip
            print(
                f"{attention:6s} L={n:5d}  {t * 1e3:8.1f} ms  {flops / t / 1e12:6.0f} TFLOP/s  MFU {mfu:.2f}",
                flush=True,
            )
        del runner
        torch.cuda.empty_cache()
    path = g.write_result("gpu_prefill", dict(
        model=args.model, matmul_tflops=peak, target_mfu_2k_plus=0.6, points=rows,
    ))  # fmt: skip
    print("\n| attention | tokens | ms | TFLOP/s | MFU | attention share of FLOPs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attention']} | {r['tokens']} | {r['ms']:.1f} | {r['tflops']:.0f} | "
              f"{r['mfu']:.2f} | {r['attention_share']:.2f} |")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
