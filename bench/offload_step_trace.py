"""Profile engine steps in swap vs recompute preemption mode (torch.profiler), to find
where a swap-mode step's extra time goes (bench/gpu_offload.py measured it).

Builds bench/gpu_offload.py's overload (random Llama-3-8B-shaped model, fcfs), runs
``--warmup`` steps, then profiles ``--steps`` steps and prints the top operators by self
CPU time and by self CUDA time, for each mode.

    PYTHONPATH=. python bench/offload_step_trace.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.gpu_offload import CUDA_DEFAULTS, workload, write_random_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    from tandem.config import ModelConfig
    from tandem.engine.llm import build_engine_config
    from tandem.engine.llm_engine import LLMEngine
    from tandem.request import SamplingParams

    model = str(write_random_llama(Path(tempfile.gettempdir()) / "tandem-bench" /
                                   f"llama3-8b-{args.num_layers}l", args.num_layers))  # fmt: skip
    wl = argparse.Namespace(**CUDA_DEFAULTS, seed=0, rate=0.0)
    wl.num_requests, wl.max_output = 128, 256
    reqs = workload(wl, ModelConfig.from_pretrained(model).vocab_size)
    for mode in ("swap", "recompute"):
        config = build_engine_config(
            model=model, device="cuda", dtype="bfloat16", kv_blocks=512,
            host_kv_blocks=16384 if mode == "swap" else 0, max_num_seqs=64,
            max_num_batched_tokens=2048, policy="fcfs",
        )  # fmt: skip
        engine = LLMEngine(config)
        for _, prompt, n in reqs:
            engine.add_request(
                prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            )
        for _ in range(args.warmup):
            engine.step()
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        print(f"===== {mode}: {args.steps} steps after {args.warmup} =====")
        print(
            ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60)
        )
        print(
            ka.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60)
        )
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
