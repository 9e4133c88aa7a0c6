"""What the GPU benchmarks share: the physical limits measured in the same run, a runner
over a random full-size model, and the JSON record beside each table.

- ``copy_bandwidth(device)``: device-to-device copy of a 2 GiB buffer, bytes read plus
  bytes written per second (what a memory-bound kernel can reach), best of 10.
- ``matmul_tflops(device)``: bf16 8192^3 matrix products, best of 10, in TFLOP/s.
- ``make_runner(name, num_layers, ...)``: a ``ModelRunner`` over ``random:NAME`` with
  ``num_layers`` layers (fewer than the model's when the KV of a point would not fit).
- ``write_result(script, payload)``: ``bench/results/<script>_<device>.json``.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str = "cuda") -> str:
    return torch.cuda.get_device_name(torch.device(device))


def device_slug(device: str = "cuda") -> str:
    name = device_name(device).lower()
    m = re.search(r"(h100|h200|a100|l40s|b200|gb200|rtx ?\d+)", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name)).replace(" ", "")


def events_ms(fn, iters: int) -> float:
    """Best of ``iters`` runs of ``fn``, in ms of device time (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def median_step_s(runner, sched, warmup: int, iters: int) -> float:
    """Median wall seconds of ``runner.execute(sched)`` after ``warmup`` runs. Each run ends
    with the sampled ids read on the host, so it is synchronised: wall time is the step."""
    for _ in range(warmup):
        runner.execute(sched)
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.execute(sched)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: str = "cuda", nbytes: int = 2 * 2**30) -> float:
    """Bytes/s of read + write traffic of a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = events_ms(lambda: dst.copy_(src), 10)
    return 2 * nbytes / (ms / 1e3)


def matmul_tflops(device: str = "cuda", n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    ms = events_ms(lambda: a @ b, 10)
    return 2 * n**3 / (ms / 1e3) / 1e12


def model_config(name: str, num_layers: int | None = None):
    from tandem.config import ModelConfig
    from tandem.random_model import resolve_model

    folder = resolve_model(f"random:{name}")
    cfg = ModelConfig.from_pretrained(folder)
    return folder, (replace(cfg, num_layers=num_layers) if num_layers else cfg)


def make_runner(
    name: str,
    num_layers: int | None,
    num_blocks: int,
    max_num_seqs: int,
    max_model_len: int,
    max_batched_tokens: int = 8192,
    device: str = "cuda",
    attention: str = "auto",
    cuda_graphs: bool = True,
):
    from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
    from tandem.runner.model_runner import ModelRunner

    folder, cfg = model_config(name, num_layers)
    config = EngineConfig(
        model=folder,
        device=device,
        dtype="bfloat16",
        cache=CacheConfig(block_size=16, num_blocks=num_blocks),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_batched_tokens,
            max_model_len=max_model_len,
        ),
        attention=attention,
        cuda_graphs=cuda_graphs,
    )
    return ModelRunner(config, cfg), cfg


def weight_bytes(cfg, batch: int, dtype_bytes: int = 2) -> int:
    """Bytes of weights one forward pass reads: all of them but the embedding table, of
    which only ``batch`` rows are read."""
    emb = cfg.vocab_size * cfg.hidden_size
    read_emb = batch * cfg.hidden_size
    if cfg.tie_word_embeddings:  # the table is read whole as the LM head
        return cfg.num_params() * dtype_bytes
    return (cfg.num_params() - emb + read_emb) * dtype_bytes


def kv_bytes_per_token(cfg, dtype_bytes: int = 2) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def linear_flops_per_token(cfg) -> int:
    """2 x the parameters every token multiplies (all but the embedding table)."""
    emb = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return 2 * (cfg.num_params() - emb)


def attention_flops(cfg, q_len: int, prefix: int = 0) -> int:
    """QK^T and PV for q_len causal queries after ``prefix`` cached tokens, all layers."""
    pairs = q_len * prefix + q_len * (q_len + 1) // 2
    return cfg.num_layers * 2 * 2 * cfg.num_heads * cfg.head_dim * pairs


def write_result(script: str, payload: dict, device: str = "cuda") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{script}_{device_slug(device)}.json"
    payload = {"script": script, "device": device_name(device), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
