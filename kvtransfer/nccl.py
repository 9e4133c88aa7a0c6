"""``nccl`` backend: the tcp control plane, K/V bytes over an NCCL communicator (GPU to GPU).

Offers, answers and the request state travel on the tcp backend's connection, unchanged;
only the payload leg differs (``kvtransfer.channel``). One connection per (sender,
receiver) pair carries one communicator and one transfer at a time, so transfers to one
destination queue in order while different destinations proceed in parallel::

    sender (rank 0)                                  receiver (rank 1)
    connect; uid = unique_id()
    ── {kv_comm_init, uid} ─────────────────────────► connect(uid, rank 1)  (worker thread)
    connect(uid, rank 0)  (worker thread)             (collective: both return together)
                          ◄───────────────────────── {kv_comm_ready} | {kv_comm_failed, error}
    ... per transfer: OFFER / ACCEPT | REFUSE as in tcp ...
    ── state bytes ─────────────────────────────────►
    comm.send(payload) ═══════ NCCL, own stream ═════► comm.recv(staging [offer's shape])
                          ◄───────────────────────── DONE | FAILED  (commit(staging) first)

The communicator is made lazily, on a connection's first use, and dies with it. While an
NCCL call is in flight each side also watches the control connection: an answer, a closed
connection, a lapsed lease or the sender's timeout aborts the local communicator (a half-done
NCCL call poisons it), closes the connection, and the next transfer builds a new pair.
Failures map onto the usual contract: the sender raises ``TransferError``, the receiver
aborts the reservation. ``maybe_committed`` is set once the sender's NCCL send completed;
before that the receiver cannot hold every byte (its receive ends after the send), but a
send that completed the moment the timeout fired can still be missed (a thread hand-off).

Blocking calls (communicator set-up, send, receive) run on one ``Worker`` thread per
channel. The ``comms`` factory is CuPy NCCL by default (``kvtransfer.nccl_cupy``, imported
when a backend object is built); tests pass ``kvtransfer.comm.LoopbackComms``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from kvtransfer import wire
from kvtransfer.base import Progress, ReceiverCallbacks, TransferState
from kvtransfer.channel import PayloadError, ReceiverChannel, SenderChannel
from kvtransfer.comm import Comm, CommError, CommFactory, Worker, discard
from kvtransfer.tcp import TcpKVReceiver, TcpKVSender
from kvtransfer.wire import Offer
from tandem import protocol

log = logging.getLogger("tandem.kvtransfer")

SEND_GRACE_S = 1.0  # after an answer or a hang-up, how long a pending send may still finish


def _default_comms() -> CommFactory:
    from kvtransfer.nccl_cupy import CupyComms

    return CupyComms()


def resolve_device(device: str) -> str:
    """``cuda`` -> ``cuda:<current device>``, read on the caller's thread (worker threads
    start on device 0, whatever the process chose with ``torch.cuda.set_device``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


def _poison_comm(channel: Any) -> None:
    """A channel's communicator is poisoned (a call failed or was cut short): abort it, and
    the connection closes after the current answer (``usable``)."""
    channel.usable = False
    if channel.comm is not None:
        discard(channel.comm)
        channel.comm = None


def _close_comm(channel: Any) -> None:
    _poison_comm(channel)
    channel.worker.stop()


class NcclSenderChannel(SenderChannel):
    name = "nccl"

    def __init__(self, comms: CommFactory, device: str) -> None:
        super().__init__()
        self.comms, self.device = comms, device
        self.comm: Comm | None = None
        self.worker = Worker("kv-nccl-send")

    async def open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = await self.worker.submit(self.comms.unique_id)
        writer.write(protocol.pack_frame({"type": "kv_comm_init", "uid": bytes(uid)}))
        await writer.drain()
        joined = self.worker.submit(self.comms.connect, uid, 0, self.device, orphan=discard)
        try:
            reply = await protocol.read_frame(reader)
            if reply.get("type") != "kv_comm_ready":
                raise CommError(
                    "the KV receiver could not join the NCCL channel: "
                    f"{reply.get('error', reply.get('type'))}"
                )
            self.comm = await joined
        except BaseException:
            self.usable = False
            _drop(joined)
            raise

    async def send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        offer: Offer,
        state_bytes: bytes,
        payload: torch.Tensor,
        progress: Progress,
    ) -> dict[str, Any]:
        if self.comm is None:
            raise CommError("no communicator (the channel was not opened)")
        writer.write(state_bytes)
        await writer.drain()
        if offer.payload_nbytes == 0:
            progress.state = TransferState.COMMITTING
            return await protocol.read_frame(reader)
        if not payload.is_contiguous():  # gathers are; a copy must finish before NCCL reads it
            payload = payload.contiguous()
            if payload.is_cuda:
                torch.cuda.current_stream(payload.device).synchronize()
        op = self.worker.submit(self.comm.send, payload)
        op.add_done_callback(lambda f: _committing_if_sent(f, progress))
        answer = asyncio.ensure_future(protocol.read_frame(reader))
        try:
            await asyncio.wait({op, answer}, return_when=asyncio.FIRST_COMPLETED)
            if not op.done():
                # Answered or hung up while our send is pending. The receiver may already hold
                # everything (its receive can end before we notice our send did): wait a bit.
                await asyncio.wait({op}, timeout=SEND_GRACE_S)
            if op.done() and op.exception() is None:
                return await answer
            self._poison()
            if op.done():
                raise CommError(f"NCCL send failed: {op.exception()}")
            return await answer  # kv_failed, or the receiver hung up: the caller closes
        finally:
            await _cancelled(answer)
            if not op.done():
                self._poison()  # cancelled (sender timeout) mid-send

    _poison = _poison_comm
    close = _close_comm


def _drop(joined: asyncio.Future[Any]) -> None:
    """Give up on a communicator set-up: abort its communicator, now or when it comes."""
    if not joined.done():
        joined.cancel()  # the worker's orphan hook aborts a communicator that still comes
    elif not joined.cancelled() and joined.exception() is None:
        discard(joined.result())


async def _cancelled(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
        await asyncio.wait({task})


def _committing_if_sent(op: asyncio.Future[Any], progress: Progress) -> None:
    if not op.cancelled() and op.exception() is None:
        progress.state = TransferState.COMMITTING


class NcclReceiverChannel(ReceiverChannel):
    name = "nccl"

    def __init__(self, comms: CommFactory, device: str, init_timeout_s: float) -> None:
        super().__init__()
        self.comms, self.device, self.init_timeout_s = comms, device, init_timeout_s
        self.comm: Comm | None = None
        self.worker = Worker("kv-nccl-recv")

    async def on_frame(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: dict[str, Any]
    ) -> bool:
        if msg.get("type") != "kv_comm_init":
            return False
        if self.comm is not None:
            raise protocol.ProtocolError("kv_comm_init on a connection that has a communicator")
        uid = bytes(msg.get("uid", b""))
        joined = self.worker.submit(self.comms.connect, uid, 1, self.device, orphan=discard)
        try:
            self.comm = await asyncio.wait_for(joined, self.init_timeout_s)
        except Exception as e:
            self.usable = False
            _drop(joined)
            why = "timed out" if isinstance(e, asyncio.TimeoutError) else repr(e)
            log.warning("NCCL communicator set-up with a KV sender failed: %s", why)
            writer.write(protocol.pack_frame({"type": "kv_comm_failed", "error": why}))
            await writer.drain()
            raise ConnectionError(f"NCCL communicator set-up failed: {why}") from e
        writer.write(protocol.pack_frame({"type": "kv_comm_ready"}))
        await writer.drain()
        return True

    async def receive(
        self, reader: asyncio.StreamReader, offer: Offer
    ) -> tuple[bytes, torch.Tensor]:
        state_bytes = await reader.readexactly(offer.state_nbytes)
        comm = self.comm
        if comm is None:
            raise protocol.ProtocolError("an NCCL payload before kv_comm_init")
        dtype = wire.to_dtype(offer.dtype)
        if offer.payload_nbytes == 0:
            return state_bytes, torch.empty(offer.shape, dtype=dtype, device=self.device)
        op = self.worker.submit(_recv, comm, offer.shape, dtype)
        hangup = asyncio.ensure_future(reader.read(1))  # the sender is silent until DONE
        try:
            await asyncio.wait({op, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if op.done():
                if op.exception() is not None:
                    self._poison()
                    raise PayloadError(f"NCCL receive failed: {op.exception()}")
                return state_bytes, op.result()
            self._poison()
            raise ConnectionError("the sender's connection ended while NCCL bytes were moving")
        finally:
            await _cancelled(hangup)  # the stream takes the next frame only once it is gone
            if not op.done():
                self._poison()

    _poison = _poison_comm
    close = _close_comm


def _recv(comm: Comm, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    staging = comm.empty(shape, dtype)  # [layers, 2, n_blocks, block_size, Hkv, D]
    comm.recv(staging)
    return staging


class NcclKVSender(TcpKVSender):
    """``send(dest, bundle)`` with ``bundle.payload`` on this sender's CUDA ``device``,
    complete (``ModelRunner.gather_blocks`` synchronises)."""

    name = "nccl"

    def __init__(
        self,
        compat_hash: str,
        timeout_s: float = 30.0,
        device: str = "cuda",
        comms: CommFactory | None = None,
    ) -> None:
        factory = self.comms = comms if comms is not None else _default_comms()
        where = resolve_device(device)
        super().__init__(
            compat_hash,
            timeout_s,
            max_connections=1,  # one communicator per pair: one ordered channel
            channel=lambda: NcclSenderChannel(factory, where),
        )


class NcclKVReceiver(TcpKVReceiver):
    """Receives into staging tensors on its CUDA ``device``; ``commit`` gets them there."""

    name = "nccl"

    def __init__(
        self,
        compat_hash: str,
        callbacks: ReceiverCallbacks,
        host: str = "127.0.0.1",
        port: int = 0,
        lease_s: float = 30.0,
        device: str = "cuda",
        comms: CommFactory | None = None,
        init_timeout_s: float = 60.0,
    ) -> None:
        factory = self.comms = comms if comms is not None else _default_comms()
        where = resolve_device(device)
        super().__init__(
            compat_hash,
            callbacks,
            host=host,
            port=port,
            lease_s=lease_s,
            channel=lambda: NcclReceiverChannel(factory, where, init_timeout_s),
        )
