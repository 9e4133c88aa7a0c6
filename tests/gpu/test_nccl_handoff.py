"""The nccl KV backend on two GPUs, two processes (NCCL needs one process per rank here).

- Payloads of every dtype (bf16 first) cross from cuda:0 (this process, rank 0) to cuda:1
  (``tests.gpu.nccl_peer``, rank 1) bit for bit, one at a time and queued on the pair.
- A peer that dies leaves a communicator behind: the next transfer to it fails cleanly and a
  new peer gets a new communicator.
- ``tandem serve`` with prefill on cuda:0 and decode on cuda:1 hands every request over NCCL
  and produces the same greedy tokens as a colocated server.

Skipped unless two CUDA devices and CuPy with NCCL are present. No pytest-asyncio here.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
import torch

from kvtransfer import KVBundle, NcclKVSender, TransferError
from tests.e2e.servers import serve
from tests.gpu.nccl_peer import payload, peer

HASH = "nccl-peer"  # the peer's default compat hash


def _why_skip() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return "needs 2 CUDA devices"
    try:
        from cupy.cuda import nccl
    except ImportError:
        return "needs cupy (cupy-cuda13x)"
    return None if getattr(nccl, "available", True) else "cupy cannot load NCCL"


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))


def bundle(rid: str, seed: int, shape: list[int], dtype=torch.bfloat16) -> KVBundle:
    data = payload(seed, shape, dtype, "cuda:0")
    torch.cuda.synchronize("cuda:0")  # a sent payload must be complete (as gather_blocks is)
    return KVBundle(rid, shape[2] * shape[3] - 3, data, {"seed": seed})


def test_payloads_cross_gpus_bit_exact():
    small = [4, 2, 37, 16, 8, 128]
    big = [32, 2, 64, 16, 8, 128]  # 128 MiB of bf16
    cases = [("s0", 0, small, torch.bfloat16), ("big", 1, big, torch.bfloat16),
             ("f16", 2, small, torch.float16), ("f32", 3, small, torch.float32)]  # fmt: skip
    queued = [(f"q{i}", 10 + i, small, torch.bfloat16) for i in range(4)]

    async def run(address: str) -> NcclKVSender:
        sender = NcclKVSender(HASH, device="cuda:0", timeout_s=120.0)
        for rid, seed, shape, dtype in cases:
            await sender.send(address, bundle(rid, seed, shape, dtype))
        await asyncio.gather(*(sender.send(address, bundle(*c)) for c in queued))
        await sender.close()
        return sender

    with peer() as p:
        sender = asyncio.run(run(p.address))
        got = {}
        for _ in range(len(cases) + len(queued)):
            msg = p.next(lambda m: "committed" in m or "aborted" in m)
            got[msg.get("committed") or f"aborted:{msg['aborted']}"] = msg
    assert sorted(got) == sorted(c[0] for c in cases + queued)
    assert all(m["equal"] is True and m["device"] == "cuda:1" for m in got.values()), got
    assert sender.metrics.ok == len(got) and sender.connections_opened == 1


def test_a_dead_peer_fails_cleanly_and_a_new_peer_gets_a_new_communicator():
    shape = [2, 2, 5, 16, 8, 128]

    async def run() -> None:
        sender = NcclKVSender(HASH, device="cuda:0", timeout_s=60.0)
        with peer() as first:
            await sender.send(first.address, bundle("a", 0, shape))
            assert first.next(lambda m: "committed" in m)["equal"] is True
            dead = first.address
        with pytest.raises(TransferError):
            await sender.send(dead, bundle("b", 1, shape))
        with peer() as second:
            await sender.send(second.address, bundle("c", 2, shape))
            assert second.next(lambda m: "committed" in m)["equal"] is True
        assert sender.metrics.ok == 2 and sender.metrics.failed == 1
        await sender.close()

    asyncio.run(run())


PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Tandem hands KV caches", "hello " * 40]


def _complete(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["text"]


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    rows = [line for line in lines if line and not line.startswith("#")]
    return sum(float(row.split()[-1]) for row in rows if row.split("{")[0].split()[0] == name)


def _metric_reaches(url: str, name: str, value: float, timeout: float = 30.0) -> float:
    """Worker counters reach the router with its stats polls: wait for them."""
    deadline = time.monotonic() + timeout
    while (got := _metric(url, name)) < value and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_serve_on_two_gpus_hands_off_over_nccl_and_matches_colocated(tiny_llama_dir):
    common = ["--dtype", "float32", "--kv-blocks", "512", "--policy", "fcfs"]
    with serve(tiny_llama_dir, "--device", "cuda:0", *common) as url:
        want = [_complete(url, p) for p in PROMPTS]  # one at a time: identical batches
    disagg = ["--prefill-workers", "1", "--decode-workers", "1", "--prefill-device", "cuda:0",
              "--decode-device", "cuda:1", "--kv-transfer", "nccl"]  # fmt: skip
    with serve(tiny_llama_dir, *disagg, *common) as url:
        got = [_complete(url, p) for p in PROMPTS]
        handoffs = _metric_reaches(url, "tandem_worker_kv_handoffs_total", len(PROMPTS))
        failed = _metric(url, "tandem_worker_kv_handoffs_failed_total")
    assert got == want
    assert handoffs >= len(PROMPTS) and failed == 0, (handoffs, failed)
