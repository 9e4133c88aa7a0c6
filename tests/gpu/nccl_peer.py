"""The far end of a two-process NCCL run (GPU tests and bench/gpu_kv_handoff.py).

``python -m tests.gpu.nccl_peer --device cuda:1 [--kv-blocks N ...]`` starts an
``NcclKVReceiver`` on that GPU and talks JSON lines: it prints ``{"ready": ADDRESS}``, then
one line per event, and reads commands on stdin.

- Each committed transfer prints ``{"committed": rid, "equal": bool|null, "device": ...,
  "scatter_s": s|null}``. ``equal`` compares the payload bit for bit with
  ``payload(seed, shape, dtype)`` when the state carries a ``seed``; with ``--kv-blocks``
  the payload is also scattered into a KV tensor of that many blocks (and synchronised,
  so the scatter is inside the handoff time). Aborted reservations print ``{"aborted": rid}``.
- ``{"cmd": "raw", "uid": HEX, "nbytes": N, "iters": K}``: a plain CuPy NCCL receive loop
  as rank 1 (``raw_p2p``), answered with ``{"raw_s": seconds}``.
- ``{"cmd": "quit"}`` or end of stdin: close and exit.

``Peer`` / ``peer()`` start one from the other process and read its lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def payload(seed: int, shape: list[int], dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Random bits (NaNs and infinities included) of ``shape``: equality is bitwise."""
    g = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    bits = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return bits.view(dtype).reshape(shape).to(device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def raw_p2p(uid: bytes, rank: int, device: str, nbytes: int, iters: int, warmup: int = 3) -> float:
    """Seconds for ``iters`` NCCL sends (rank 0) or receives (rank 1) of ``nbytes`` on a
    fresh communicator and stream, timed with CUDA events after ``warmup`` rounds."""
    from kvtransfer.nccl_cupy import load_cupy, new_communicator

    nccl, cupy_device = load_cupy()
    index = torch.device(device).index or 0
    with torch.cuda.device(index), cupy_device(index):
        comm = new_communicator(nccl, uid, rank)
        stream = torch.cuda.Stream(device=index)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        op = comm.send if rank == 0 else comm.recv
        for _ in range(warmup):
            op(buf.data_ptr(), nbytes, nccl.NCCL_UINT8, 1 - rank, stream.cuda_stream)
        stream.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            op(buf.data_ptr(), nbytes, nccl.NCCL_UINT8, 1 - rank, stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        comm.abort()  # local teardown; never waits on the peer
    return start.elapsed_time(end) / 1000


class Callbacks:
    """Receiver callbacks: block ids from a simple free list, checks and reports on commit."""

    def __init__(self, device: str, kv: torch.Tensor | None, block_size: int) -> None:
        self.device, self.kv, self.block_size = device, kv, block_size
        self.free = list(range(kv.shape[2])) if kv is not None else []
        self.next_id = 0
        self.arrived: dict[str, float] = {}

    def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        n = math.ceil(num_tokens / self.block_size)
        if self.kv is None:
            ids = list(range(self.next_id, self.next_id + n))
            self.next_id += n
            return ids
        if n > len(self.free):
            from tandem.kvcache.block_pool import NoFreeBlocksError

            raise NoFreeBlocksError(f"{n} blocks wanted, {len(self.free)} free")
        ids, self.free = self.free[:n], self.free[n:]
        return ids

    def commit(
        self, request_id: str, block_ids: list[int], data: torch.Tensor, state: dict
    ) -> None:
        t0 = time.perf_counter()
        scatter_s = None
        if self.kv is not None and tuple(data.shape[3:]) == tuple(self.kv.shape[3:]):
            idx = torch.as_tensor(block_ids, dtype=torch.long, device=self.kv.device)
            self.kv.index_copy_(2, idx, data)
            data.record_stream(torch.cuda.current_stream(self.kv.device))
            torch.cuda.current_stream(self.kv.device).synchronize()
            scatter_s = time.perf_counter() - t0
        equal = None
        if "seed" in state:
            want = payload(state["seed"], list(data.shape), data.dtype, str(data.device))
            equal = same_bits(data, want)
        if self.kv is not None:
            self.free.extend(block_ids)  # the bench reuses blocks; nothing decodes here
        emit(committed=request_id, equal=equal, device=str(data.device), scatter_s=scatter_s)

    def abort(self, request_id: str, block_ids: list[int]) -> None:
        if self.kv is not None:
            self.free.extend(block_ids)
        emit(aborted=request_id)


def emit(**msg: Any) -> None:
    print(json.dumps(msg), flush=True)


async def serve(args: argparse.Namespace) -> None:
    from kvtransfer import NcclKVReceiver

    torch.cuda.set_device(torch.device(args.device))
    kv = None
    if args.kv_blocks:
        shape = (args.layers, 2, args.kv_blocks, args.block_size, args.kv_heads, args.head_dim)
        kv = torch.zeros(shape, dtype=getattr(torch, args.dtype), device=args.device)
    receiver = NcclKVReceiver(
        args.hash, Callbacks(args.device, kv, args.block_size), device=args.device, lease_s=60.0
    )
    await receiver.start()
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    emit(ready=receiver.address)
    while (cmd := await commands.get()) is not None and cmd.get("cmd") != "quit":
        if cmd.get("cmd") == "raw":
            seconds = await asyncio.to_thread(
                raw_p2p, bytes.fromhex(cmd["uid"]), 1, args.device, cmd["nbytes"], cmd["iters"]
            )
            emit(raw_s=seconds)
    await receiver.close()


# ---- the client side: run a peer from a test or a benchmark -------------------------


class Peer:
    """``tests.gpu.nccl_peer`` on cuda:1, its JSON lines collected by a thread."""

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "tests.gpu.nccl_peer", "--device", "cuda:1", *args]
        root = Path(__file__).resolve().parents[2]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = self.next(lambda m: "ready" in m, timeout=120)["ready"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def next(self, pred, timeout: float = 60.0) -> dict:
        """The next line that satisfies ``pred`` (lines before it are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise AssertionError(f"the peer exited ({self.proc.returncode})") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"the peer said nothing matching in {timeout}s") from None
                continue
            if pred(msg):
                return msg

    def command(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.command(cmd="quit")
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextlib.contextmanager
def peer(*args: str) -> Iterator[Peer]:
    p = Peer(*args)
    try:
        yield p
    finally:
        p.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda:1")
    p.add_argument("--hash", default="nccl-peer")
    p.add_argument("--kv-blocks", type=int, default=0)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
