"""Fakes for kvtransfer tests: receiver callbacks over a real (pure) KVCacheManager, and
payload bundles with random bits (NaNs and infinities included, so equality is bitwise)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from kvtransfer import KVBundle, KVReceiver, KVSender, LoopbackComms, make_receiver, make_sender
from tandem.kvcache import KVCacheManager

HASH = "c0ffee00c0ffee00"
BLOCK = 4


class FakeEngineKV:
    """Receiver callbacks that record every call. ``commit_gate`` holds commits until set;
    ``fail_commit`` makes commit raise for those ids."""

    def __init__(self, num_blocks: int = 64, block_size: int = BLOCK) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, tier="fake")
        self.committed: dict[str, tuple[list[int], torch.Tensor, dict[str, Any]]] = {}
        self.calls: list[tuple[str, str]] = []
        self.commit_gate: asyncio.Event | None = None
        self.fail_commit: set[str] = set()

    def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        self.calls.append(("reserve", request_id))
        return self.kv.reserve_import(request_id, num_tokens)

    async def commit(
        self, request_id: str, block_ids: list[int], payload: torch.Tensor, state: dict[str, Any]
    ) -> None:
        self.calls.append(("commit", request_id))
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        if request_id in self.fail_commit:
            raise RuntimeError("disk on fire")
        assert self.kv.commit_import(request_id) == block_ids
        self.committed[request_id] = (block_ids, payload.clone(), state)

    def abort(self, request_id: str, block_ids: list[int]) -> None:
        self.calls.append(("abort", request_id))
        self.kv.abort_import(request_id)

    def count(self, callback: str, request_id: str | None = None) -> int:
        return sum(1 for c, r in self.calls if c == callback and request_id in (None, r))

    def assert_clean(self) -> None:
        """No pending reservation; only committed requests hold blocks."""
        audit = self.kv.audit()
        assert audit.ok, audit
        assert not self.kv.pending_imports()
        held = sum(len(ids) for ids, _, _ in self.committed.values())
        assert self.kv.num_free_blocks == self.kv.num_blocks - held


def make_bundle(
    request_id: str,
    num_tokens: int = 10,
    dtype: torch.dtype = torch.float16,
    layers: int = 2,
    kv_heads: int = 2,
    head_dim: int = 8,
    seed: int = 0,
) -> KVBundle:
    n = math.ceil(num_tokens / BLOCK)
    shape = (layers, 2, n, BLOCK, kv_heads, head_dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8, generator=g)
    state = {
        "request_id": request_id,
        "prompt_token_ids": list(range(num_tokens - 1)),
        "output_token_ids": [7],
        "params": {"temperature": 0.0, "max_tokens": 16, "stop": ["\n\n"]},
        "num_computed_tokens": num_tokens,
        "priority": 1,
        "policy_state": {"level": 2, "served": 0.25},
    }
    return KVBundle(request_id, num_tokens, bits.view(dtype).reshape(shape), state)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def peer_options(
    backend: str, receiver: KVReceiver | None = None, comms: LoopbackComms | None = None
) -> dict[str, Any]:
    """What one end of ``backend`` needs to reach the other in a test: the local sender its
    receiver; nccl ends on a CPU shared fake communicators (NCCL's control flow, no GPU)."""
    if backend == "local" and receiver is not None:
        return {"peers": [receiver]}
    if backend == "nccl":
        if comms is None and receiver is not None:
            comms = receiver.comms  # type: ignore[attr-defined]
        return {"comms": comms or LoopbackComms(), "device": "cpu"}
    return {}


@contextlib.asynccontextmanager
async def pair(
    backend: str,
    fake: FakeEngineKV,
    sender_hash: str = HASH,
    receiver_hash: str = HASH,
    timeout_s: float = 10.0,
    lease_s: float = 10.0,
    **sender_options: Any,
) -> AsyncIterator[tuple[KVSender, KVReceiver]]:
    comms = sender_options.pop("comms", None)
    receiver_options = peer_options(backend, comms=comms)
    receiver = make_receiver(backend, receiver_hash, fake, lease_s=lease_s, **receiver_options)
    await receiver.start()
    sender_options.update(peer_options(backend, receiver, receiver_options.get("comms")))
    sender = make_sender(backend, sender_hash, timeout_s=timeout_s, **sender_options)
    try:
        yield sender, receiver
    finally:
        await sender.close()
        await receiver.close()


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
