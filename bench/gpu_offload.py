"""KV offload under overload: proactive swap vs recompute preemption vs admission limits.

One workload (a burst, or Poisson arrivals with ``--rate``) whose KV demand is far above
the device tier, run three ways on the real engine, one after another in this process:

- ``swap``:      host tier + swap preemption + proactive offload/prefetch (watermark);
- ``recompute``: no host tier; a preempted request frees its blocks and recomputes;
- ``admission``: no preemption at all beyond what fits: a request enters the engine only
  when the full KV of every request inside (prompt + max output) fits the device tier.

Per mode: mean and p99 JCT (arrival to last token), makespan, preemptions, blocks and
bytes swapped, the share of decode-loop time spent waiting on swap-ins, and the achieved
host<->device bandwidth of the swap copies (bytes over copy time; device time on CUDA).
On CUDA the run also measures the pinned-copy peak (a pinned host tensor copied with
``.to(cuda, non_blocking=True)`` and back, timed with CUDA events) to compare against.

    python bench/gpu_offload.py                          # CUDA: Llama-3-8B layer shapes
    python bench/gpu_offload.py --device cpu             # small CPU configuration

On CUDA without ``--model`` it writes a random-weight model with Llama-3-8B shapes and
``--num-layers`` layers (default 8; 32 is the full model) under ``--model-cache``.
Writes a JSON next to the table under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192,
)  # fmt: skip

CPU_DEFAULTS = dict(
    num_requests=24, min_input=16, max_input=128, min_output=16, max_output=96,
    kv_blocks=24, host_kv_blocks=1024, max_num_seqs=8, budget=256,
)  # fmt: skip
CUDA_DEFAULTS = dict(
    num_requests=256, min_input=128, max_input=1024, min_output=64, max_output=512,
    kv_blocks=512, host_kv_blocks=16384, max_num_seqs=64, budget=2048,
)  # fmt: skip


def write_random_llama(path: Path, num_layers: int, seed: int = 0) -> Path:
    """A Hugging Face folder with Llama-3-8B shapes, ``num_layers`` layers, random bf16."""
    from safetensors.torch import save_file

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    c = LLAMA3_8B
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": rnd(v, h),
        "model.norm.weight": torch.ones(h).bfloat16(),
    }
    for n in range(num_layers):
        p = f"model.layers.{n}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(h).bfloat16(),
            p + "self_attn.q_proj.weight": rnd(h, h),
            p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h),
            p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(i, h),
            p + "mlp.up_proj.weight": rnd(i, h),
            p + "mlp.down_proj.weight": rnd(h, i),
        }
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **c,
        "num_hidden_layers": num_layers, "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def pinned_peak_gbps(device: str, mib: int) -> dict[str, float]:
    """Host->device and device->host GB/s of one pinned buffer of ``mib`` MiB."""
    n = mib * 2**20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    out: dict[str, float] = {}
    for name, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
        dst.copy_(src, non_blocking=True)  # warm-up
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        out[name] = n / best / 1e9
    return out


def workload(args, vocab: int) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt ids, output tokens) per request, sorted by arrival."""
    rng = random.Random(args.seed)
    t, reqs = 0.0, []
    for _ in range(args.num_requests):
        if args.rate > 0:
            t += rng.expovariate(args.rate)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(args.min_input, args.max_input))]
        reqs.append((t, prompt, rng.randint(args.min_output, args.max_output)))
    return reqs


def run_mode(mode: str, args, model: str, cost_path: str, reqs) -> dict:
    from tandem.engine.llm import build_engine_config
    from tandem.engine.llm_engine import LLMEngine
    from tandem.request import SamplingParams

    config = build_engine_config(
        model=model, device=args.device, dtype=args.dtype, block_size=args.block_size,
        kv_blocks=args.kv_blocks, host_kv_blocks=args.host_kv_blocks if mode == "swap" else 0,
        swap_watermark=args.watermark, swap_int8=args.swap_int8 and mode == "swap",
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget,
        policy=args.policy, cost_model=cost_path,
    )  # fmt: skip
    engine = LLMEngine(config)
    bs = args.block_size
    need = [-(-(len(p) + n) // bs) for _, p, n in reqs]
    arrival: dict[str, float] = {}
    finish: dict[str, float] = {}
    reserved: dict[str, int] = {}
    queue = list(range(len(reqs)))  # not yet submitted, in arrival order
    step_s = 0.0
    step_times: dict[bool, list[float]] = {False: [], True: []}  # by "this step copied KV"
    t0 = time.perf_counter()
    while queue or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while queue and reqs[queue[0]][0] <= now:
            k = queue[0]
            if mode == "admission" and sum(reserved.values()) + need[k] > args.kv_blocks:
                break  # FIFO: the head waits until its whole KV fits
            queue.pop(0)
            _, prompt, n_out = reqs[k]
            rid = f"r{k}"
            params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
            engine.add_request(prompt, params, request_id=rid)
            arrival[rid] = reqs[k][0]
            reserved[rid] = need[k]
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, reqs[queue[0]][0] - (time.perf_counter() - t0)))
            continue
        moved_before = engine.scheduler.swap.out_blocks + engine.scheduler.swap.in_blocks
        s = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - s
        step_s += dt
        copied = engine.scheduler.swap.out_blocks + engine.scheduler.swap.in_blocks > moved_before
        step_times[copied].append(dt)
        for o in outs:
            if o.finished:
                finish[o.request_id] = time.perf_counter() - t0
                reserved.pop(o.request_id)
    jct = sorted(finish[r] - arrival[r] for r in finish)
    sched = engine.scheduler
    swap = asdict(sched.swap)
    moved = swap["out_bytes"] + swap["in_bytes"]
    row = {
        "mode": mode,
        "finished": len(finish),
        "mean_jct_s": statistics.fmean(jct),
        "p99_jct_s": jct[min(len(jct) - 1, int(0.99 * len(jct)))],
        "makespan_s": max(finish.values()),
        "decode_loop_s": step_s,
        "steps": len(step_times[False]) + len(step_times[True]),
        "steps_with_copies": len(step_times[True]),
        "mean_step_ms_with_copies": 1000 * statistics.fmean(step_times[True])
        if step_times[True]
        else None,
        "mean_step_ms_without_copies": 1000 * statistics.fmean(step_times[False])
        if step_times[False]
        else None,
        "preemptions": sched.num_preemptions,
        "swap": swap,
        "swap_in_wait_share": swap["in_wait_s"] / step_s if step_s else 0.0,
        "swap_gbps": moved / swap["copy_s"] / 1e9 if swap["copy_s"] else None,
    }
    assert sched.device_kv.audit().ok and sched.device_kv.num_free_blocks == args.kv_blocks
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None)
    ap.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "tandem-bench"))
    ap.add_argument("--num-layers", type=int, default=8, help="CUDA random model: layers")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--policy", default="mlfq", choices=["fcfs", "mlfq", "alise"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--watermark", type=float, default=0.05)
    ap.add_argument("--swap-int8", action="store_true")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (0: one burst)")
    ap.add_argument("--peak-mib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="swap,recompute,admission")
    for name in CPU_DEFAULTS:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    for name, value in (CUDA_DEFAULTS if cuda else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    model = args.model
    if model is None and cuda:
        model = str(
            write_random_llama(
                Path(args.model_cache) / f"llama3-8b-{args.num_layers}l", args.num_layers
            )
        )

    from tandem.config import ModelConfig
    from tandem.engine.llm import build_engine_config
    from tandem.engine.llm_engine import LLMEngine
    from tandem.runner.profile import profile_cost_model

    # One cost model for all modes, profiled on an engine with room to profile.
    base = build_engine_config(
        model=model, device=args.device, dtype=args.dtype, block_size=args.block_size,
        kv_blocks=max(args.kv_blocks, 4 * args.max_num_seqs), policy="fcfs",
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget,
    )  # fmt: skip
    model = base.model
    prof = LLMEngine(base)
    cost = profile_cost_model(prof.runner, args.budget, args.max_num_seqs)
    del prof
    cost_path = str(Path(tempfile.mkdtemp()) / "cost.json")
    cost.save(cost_path)

    reqs = workload(args, ModelConfig.from_pretrained(model).vocab_size)
    peak = pinned_peak_gbps(args.device, args.peak_mib) if cuda else None
    rows = [run_mode(m, args, model, cost_path, reqs) for m in args.modes.split(",")]

    demand = sum(-(-(len(p) + n) // args.block_size) for _, p, n in reqs)
    print(
        f"device {args.device}, model {Path(model).name}, {args.dtype}, policy {args.policy}; "
        f"{len(reqs)} requests ({'burst' if args.rate <= 0 else f'{args.rate}/s'}), "
        f"KV demand {demand} blocks vs {args.kv_blocks} device blocks of {args.block_size} tokens"
    )
    print(
        "| mode | mean JCT s | p99 JCT s | makespan s | preemptions | blocks out/in "
        "| proactive outs / prefetches | swap-in wait share | swap GB/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        s = r["swap"]
        gbps = f"{r['swap_gbps']:.2f}" if r["swap_gbps"] else "-"
        print(
            f"| {r['mode']} | {r['mean_jct_s']:.3f} | {r['p99_jct_s']:.3f} | "
            f"{r['makespan_s']:.3f} | {r['preemptions']} | {s['out_blocks']}/{s['in_blocks']} | "
            f"{s['proactive_outs']}/{s['prefetches']} | {100 * r['swap_in_wait_share']:.2f}% | {gbps} |"
        )
    for r in rows:
        w, wo = r["mean_step_ms_with_copies"], r["mean_step_ms_without_copies"]
        print(f"{r['mode']}: {r['steps']} steps, mean step {wo or 0:.2f} ms without KV copies, "
              f"{w or 0:.2f} ms in the {r['steps_with_copies']} steps with copies")  # fmt: skip
    if peak:
        print(
            f"pinned-copy peak: host->device {peak['h2d']:.1f} GB/s, device->host {peak['d2h']:.1f} GB/s"
        )
    else:
        print("pinned-copy peak: not measured on CPU (swap copies are plain memory copies there)")
    out = Path(
        args.out
        or Path(__file__).parent / "results" / f"gpu_offload_{args.device.split(':')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model": model, "kv_demand_blocks": demand,
                               "pinned_peak_gbps": peak, "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
