"""Point-to-point communicators behind the ``nccl`` payload leg, and the thread that drives them.

A ``Comm`` is one ordered two-rank byte channel: rank 0 (the KV sender) sends, rank 1 (the
KV receiver) receives, and the i-th ``send`` lands in the i-th ``recv``. The real one wraps
a CuPy NCCL communicator (``kvtransfer.nccl_cupy``); ``LoopbackComms`` is the in-process
fake that tests use to drive the whole backend on a CPU.

Contract (every call but ``abort`` blocks, so the backend runs them on a ``Worker`` thread,
never on the event loop):

- ``CommFactory.unique_id() -> bytes``: made by rank 0, carried to rank 1 in a control frame.
- ``CommFactory.connect(uid, rank, device) -> Comm``: collective; returns once both ranks
  joined. ``CommError`` on failure.
- ``Comm.send(t)`` / ``Comm.recv(t)``: return once ``t``'s bytes left / arrived. A sent
  tensor must be complete (no pending writes on any stream); ``recv`` fills a tensor from
  ``Comm.empty``. ``CommError`` on failure.
- ``Comm.abort()``: from any thread, at any time; a ``send``/``recv`` blocked in another
  thread raises ``CommError`` soon after. Only this rank's end is aborted: the peer's
  pending call stays blocked until the peer aborts too (as with NCCL), so each side must
  watch its control connection. A failed or aborted comm is poisoned: discard it.
- ``Comm.close()``: release it (no call in flight).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

HANG_LIMIT_S = 60.0  # how long a faked hang lasts at most (so test threads always end)


class CommError(RuntimeError):
    """A communicator call failed; the communicator is poisoned."""


class Comm(abc.ABC):
    @abc.abstractmethod
    def send(self, tensor: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def recv(self, tensor: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor that ``recv`` can fill (on this comm's device)."""

    @abc.abstractmethod
    def abort(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class CommFactory(abc.ABC):
    @abc.abstractmethod
    def unique_id(self) -> bytes: ...

    @abc.abstractmethod
    def connect(self, uid: bytes, rank: int, device: str) -> Comm: ...


class Worker:
    """One daemon thread that runs blocking calls in order and resolves asyncio futures.

    A call that never returns (a hung collective) holds the thread forever; its owner then
    stops using it (the channel is discarded) and, being a daemon, it never blocks exit.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[..., Any], *args: Any, orphan: Callable[[Any], None] | None = None
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` on the thread. ``orphan(result)`` runs if the future was
        cancelled before the result came, so nothing it made leaks; it must not block."""
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)  # errors are read by whoever still cares
        self._jobs.put((fut, fn, args, orphan))
        return fut

    def post(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` on the thread after the calls before it; nobody waits for it."""
        self._jobs.put((None, fn, (), None))

    def stop(self) -> None:
        """End the thread once the calls queued so far have run."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args, orphan = job
            try:
                ok, value = True, fn(*args)
            except BaseException as e:  # handed to the future
                ok, value = False, e
            if fut is None:
                continue
            try:
                fut.get_loop().call_soon_threadsafe(_resolve, fut, ok, value, orphan)
            except RuntimeError:  # the loop is closed: nobody will look at the result
                _resolve(fut, ok, value, orphan, closed=True)


def _resolve(
    fut: asyncio.Future[Any],
    ok: bool,
    value: Any,
    orphan: Callable[[Any], None] | None,
    closed: bool = False,
) -> None:
    if closed or fut.done():
        if ok and orphan is not None:
            with contextlib.suppress(Exception):
                orphan(value)
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def discard(comm: Comm) -> None:
    """Abort ``comm`` on a thread of its own (an abort may take a while; never on the loop)."""
    threading.Thread(target=comm.abort, name="kv-comm-abort", daemon=True).start()


# ---- the in-process fake ------------------------------------------------------------------


class _Pair:
    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.pipe: queue.Queue[torch.Tensor] = queue.Queue()
        self.sending = 0  # sends in progress on this pair


class LoopbackComms(CommFactory):
    """Fake communicators for one process: a send's bytes go through a queue to the peer.

    ``faults`` are consumed in order by the first matching call: ``(op, kind)`` with ``op``
    in ``connect | send | recv`` and ``kind`` ``"error"`` (raise ``CommError``) or ``"hang"``
    (block until aborted) or ``"ok"`` (nothing: it targets a later call). While ``send_gate`` is cleared, sends wait for it. Counters let
    tests check lazy creation (``connects``) and per-pair serialisation (``peak_sending``).
    """

    def __init__(self, connect_timeout_s: float = 10.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.faults: list[tuple[str, str]] = []
        self.send_gate = threading.Event()
        self.send_gate.set()
        self.connects = 0
        self.comms: list[LoopbackComm] = []
        self.peak_sending = 0  # most sends in progress at once on one pair
        self._pairs: dict[bytes, _Pair] = {}
        self._lock = threading.Lock()

    def unique_id(self) -> bytes:
        return os.urandom(16)

    def sending(self) -> int:
        """Sends in progress right now, all pairs together."""
        with self._lock:
            return sum(p.sending for p in self._pairs.values())

    def connect(self, uid: bytes, rank: int, device: str) -> LoopbackComm:
        with self._lock:
            pair = self._pairs.setdefault(bytes(uid), _Pair())
        comm = LoopbackComm(self, pair, rank, device)
        comm.fault("connect")
        try:
            pair.barrier.wait(self.connect_timeout_s)
        except threading.BrokenBarrierError:
            raise CommError(f"rank {rank}: the peer did not join") from None
        with self._lock:
            self.connects += 1
            self.comms.append(comm)
        return comm

    def take_fault(self, op: str) -> str | None:
        with self._lock:
            for i, (name, kind) in enumerate(self.faults):
                if name == op:
                    del self.faults[i]
                    return kind
        return None

    def count(self, pair: _Pair, delta: int) -> None:
        with self._lock:
            pair.sending += delta
            self.peak_sending = max(self.peak_sending, pair.sending)


class LoopbackComm(Comm):
    def __init__(self, factory: LoopbackComms, pair: _Pair, rank: int, device: str) -> None:
        self.factory, self.pair, self.rank, self.device = factory, pair, rank, device
        self.aborted = threading.Event()
        self.closed = False

    def fault(self, op: str) -> None:
        kind = self.factory.take_fault(op)
        if kind == "error":
            raise CommError(f"injected {op} error")
        if kind == "hang":
            self.aborted.wait(HANG_LIMIT_S)
            raise CommError(f"{op} aborted while hanging")

    def _check(self) -> None:
        if self.aborted.is_set() or self.closed:
            raise CommError("communicator is aborted or closed")

    def send(self, tensor: torch.Tensor) -> None:
        self._check()
        self.factory.count(self.pair, +1)
        try:
            while not self.factory.send_gate.wait(0.01):
                self._check()
            self.fault("send")
            self._check()
            self.pair.pipe.put(tensor.detach().contiguous().view(torch.uint8).flatten().clone())
        finally:
            self.factory.count(self.pair, -1)

    def recv(self, tensor: torch.Tensor) -> None:
        self._check()
        self.fault("recv")
        while True:
            try:
                data = self.pair.pipe.get(timeout=0.01)
                break
            except queue.Empty:
                self._check()
        nbytes = math.prod(tensor.shape) * tensor.element_size()
        if data.numel() != nbytes:
            raise CommError(f"received {data.numel()} bytes into a buffer of {nbytes}")
        tensor.view(torch.uint8).view(-1).copy_(data)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def abort(self) -> None:
        self.aborted.set()

    def close(self) -> None:
        self.closed = True
