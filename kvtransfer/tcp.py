"""``tcp`` backend: asyncio streams, one persistent connection per transfer in flight.

Wire format of one transfer on a connection (control frames are ``tandem.protocol``
frames: 4-byte big-endian length + msgpack map with a ``type``)::

    S -> R  frame  {type: kv_offer, payload, request_id, compat_hash, num_blocks,
                    num_tokens, state_nbytes, payload_nbytes, dtype, shape}
    R -> S  frame  {type: kv_accept, request_id, num_blocks, skip}   (``skip``: the offer's
                   leading named blocks the receiver holds; what follows is ``offer.skip(skip)``)
              or   {type: kv_refuse, request_id, reason, error}        (connection stays usable)
    S -> R  raw    state_nbytes bytes of msgpack state, then payload_nbytes bytes of the
                   tensor in C order (written in ``chunk_bytes`` pieces; the offer's sizes
                   delimit them, so no per-chunk header is needed): the ``tcp`` payload
                   leg. Another leg (``kvtransfer.channel``) moves these its own way; the
                   offer's ``payload`` names the leg and a receiver refuses another one.
    R -> S  frame  {type: kv_done, request_id}
              or   {type: kv_failed, request_id, error}   (commit raised; reservation aborted)

After a refuse, done or failed answer the connection carries the next transfer. Any other
failure (timeout, lapsed lease, broken stream) closes it: a half-sent byte stream cannot
be resynchronised. The sender keeps idle connections per destination and opens a new one
when all are busy (at most ``max_connections`` per destination; more transfers wait for
a slot inside their timeout). A reused connection that turns out dead before the offer was
answered is replaced once: nothing can have been reserved on it. Each connection has its own
payload channel on both ends (``channel=`` factories), opened and closed with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvtransfer import wire
from kvtransfer.base import (
    KVReceiver,
    KVSender,
    Progress,
    ReceiverCallbacks,
    RefuseReason,
    TransferError,
    TransferMetrics,
    TransferRefused,
    TransferState,
)
from kvtransfer.channel import (
    PayloadError,
    ReceiverChannel,
    SenderChannel,
    TcpReceiverChannel,
    TcpSenderChannel,
)
from kvtransfer.inbound import InboundTransfers
from kvtransfer.wire import Offer
from tandem import protocol

log = logging.getLogger("tandem.kvtransfer")

_CONN_ERRORS = (asyncio.IncompleteReadError, ConnectionError, OSError, protocol.ProtocolError)


def _split_address(dest: str) -> tuple[str, int]:
    host, sep, port = dest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"KV receiver address must be host:port, got {dest!r}")
    return host.strip("[]"), int(port)


# ---- receiver ------------------------------------------------------------------------


class TcpKVReceiver(KVReceiver):
    name = "tcp"

    def __init__(
        self,
        compat_hash: str,
        callbacks: ReceiverCallbacks,
        host: str = "127.0.0.1",
        port: int = 0,
        lease_s: float = 30.0,
        chunk_bytes: int = wire.CHUNK_BYTES,
        channel: Callable[[], ReceiverChannel] | None = None,
    ) -> None:
        """``channel()`` makes the payload leg of each connection (default: bytes on it)."""
        self.metrics = TransferMetrics()
        self._inbound = InboundTransfers(compat_hash, callbacks, lease_s, self.metrics)
        self.host, self.port, self.chunk_bytes = host, port, chunk_bytes
        self._channel = channel or (lambda: TcpReceiverChannel(chunk_bytes))
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=self.chunk_bytes
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await self._inbound.close()

    def transfers(self) -> dict[str, TransferState]:
        return self._inbound.states()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        channel = self._channel()
        try:
            while await self._one(reader, writer, channel):
                pass
        except _CONN_ERRORS as e:
            log.debug("KV connection from %s ended: %r", writer.get_extra_info("peername"), e)
        except asyncio.CancelledError:
            pass  # close() ended it; end quietly (asyncio logs a cancelled handler task)
        finally:
            self._conns.discard(task)
            writer.transport.abort()
            channel.close()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: ReceiverChannel
    ) -> bool:
        """Serve one transfer (or one set-up frame of the channel); False when the
        connection must close."""
        try:
            msg = await protocol.read_frame(reader)
        except asyncio.IncompleteReadError:
            return False  # the sender closed an idle connection
        if msg["type"] != "kv_offer":
            if await channel.on_frame(reader, writer, msg):
                return True
            why = (
                f"unexpected {msg['type']!r} frame: this KV receiver takes {channel.name} payloads"
            )
            await _answer(writer, {"type": "kv_error", "error": why})
            raise protocol.ProtocolError(f"expected kv_offer, got {msg['type']!r}")
        rid = str(msg.get("request_id", ""))
        try:
            leg = msg.get("payload", "tcp")
            if leg != channel.name:
                raise ValueError(
                    f"this KV receiver takes {channel.name} payloads, the sender offered {leg} "
                    "(both ends need the same KV transfer backend)"
                )
            offer = Offer.from_dict(msg)
            block_ids, skip = await self._inbound.accept(offer, on_expire=writer.transport.abort)
        except (ValueError, TransferRefused) as e:
            reason = e.reason if isinstance(e, TransferRefused) else RefuseReason.BAD_OFFER
            if not isinstance(e, TransferRefused):
                self.metrics.failed += 1
                self.metrics.refused += 1
            refuse = {"type": "kv_refuse", "reason": reason.value, "error": str(e)}
            await _answer(writer, {**refuse, "request_id": rid})
            return True
        try:
            accept = {"type": "kv_accept", "request_id": rid, "num_blocks": len(block_ids)}
            await _answer(writer, {**accept, "skip": skip})
            state_bytes, payload = await channel.receive(reader, offer.skip(skip))
            state = wire.unpack_state(state_bytes)
        except (PayloadError, ValueError) as e:  # the control stream is still in sync
            await self._inbound.drop(rid, str(e))
            reply = {"type": "kv_failed", "request_id": rid, "error": str(e)}
        except BaseException as e:
            await self._inbound.drop(rid, f"connection lost mid-payload: {e!r}")
            raise
        else:
            try:
                await self._inbound.finish(rid, state, payload)
                reply = {"type": "kv_done", "request_id": rid}
            except TransferError as e:
                reply = {"type": "kv_failed", "request_id": rid, "error": str(e)}
        await _answer(writer, reply)
        return channel.usable


async def _answer(writer: asyncio.StreamWriter, msg: dict) -> None:
    writer.write(protocol.pack_frame(msg))
    await writer.drain()


# ---- sender --------------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    channel: SenderChannel = field(default_factory=TcpSenderChannel)
    reused: bool = False
    clean: bool = False  # True only between transfers (stream and channel in sync)

    def alive(self) -> bool:
        return (
            self.channel.usable
            and not self.writer.transport.is_closing()
            and not self.reader.at_eof()
        )

    def close(self) -> None:
        self.writer.transport.abort()
        self.channel.close()


class _StaleConnection(Exception):
    """A reused connection died before the offer was answered (safe to retry)."""


class TcpKVSender(KVSender):
    name = "tcp"

    def __init__(
        self,
        compat_hash: str,
        timeout_s: float = 30.0,
        chunk_bytes: int = wire.CHUNK_BYTES,
        max_connections: int = 8,
        channel: Callable[[], SenderChannel] | None = None,
    ) -> None:
        """``channel()`` makes the payload leg of each connection (default: bytes on it)."""
        super().__init__(compat_hash, timeout_s)
        if chunk_bytes < 1 or max_connections < 1:
            raise ValueError("chunk_bytes and max_connections must be >= 1")
        self.chunk_bytes = chunk_bytes
        self.max_connections = max_connections
        self._channel = channel or (lambda: TcpSenderChannel(chunk_bytes))
        self.connections_opened = 0
        self._idle: dict[str, list[_Conn]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _transfer(
        self,
        dest: str,
        offer: Offer,
        state_bytes: bytes,
        payload: torch.Tensor,
        progress: Progress,
    ) -> None:
        if self._closed:
            raise TransferError(offer.request_id, "sender is closed")
        slots = self._slots.setdefault(dest, asyncio.Semaphore(self.max_connections))
        async with slots:
            try:
                await self._over(
                    await self._checkout(dest), dest, offer, state_bytes, payload, progress
                )
            except _StaleConnection:
                await self._over(
                    await self._connect(dest), dest, offer, state_bytes, payload, progress
                )

    async def _checkout(self, dest: str) -> _Conn:
        idle = self._idle.get(dest, [])
        while idle:
            conn = idle.pop()
            if conn.alive():
                conn.reused = True
                return conn
            conn.close()
        return await self._connect(dest)

    async def _connect(self, dest: str) -> _Conn:
        host, port = _split_address(dest)
        reader, writer = await asyncio.open_connection(host, port)
        self.connections_opened += 1
        conn = _Conn(reader, writer, self._channel())
        try:
            await conn.channel.open(reader, writer)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _over(
        self,
        conn: _Conn,
        dest: str,
        offer: Offer,
        state_bytes: bytes,
        payload: torch.Tensor,
        progress: Progress,
    ) -> None:
        """One transfer on ``conn``; it goes back to the idle list only if it ends in sync."""
        conn.clean = False
        try:
            await self._handshake(conn, offer, progress)
            skip = progress.skip
            reply = await conn.channel.send(
                conn.reader, conn.writer, offer.skip(skip), state_bytes, payload[:, :, skip:],
                progress,
            )  # fmt: skip
            self._check_answer(reply, offer.request_id)
            conn.clean = conn.channel.usable
            if reply["type"] == "kv_failed":
                raise TransferError(
                    offer.request_id,
                    f"receiver {dest} could not commit {offer.request_id!r}: {reply.get('error')}",
                )
            if reply["type"] != "kv_done":
                conn.clean = False
                raise protocol.ProtocolError(f"expected kv_done, got {reply['type']!r}")
            progress.state = TransferState.DONE
        finally:
            if conn.clean and not self._closed:
                self._idle.setdefault(dest, []).append(conn)
            else:
                conn.close()

    async def _handshake(self, conn: _Conn, offer: Offer, progress: Progress) -> None:
        progress.state = TransferState.OFFERED
        try:
            frame = {"type": "kv_offer", "payload": conn.channel.name, **offer.to_dict()}
            conn.writer.write(protocol.pack_frame(frame))
            await conn.writer.drain()
            reply = await self._reply(conn, offer.request_id)
        except _CONN_ERRORS as e:
            if conn.reused:
                raise _StaleConnection() from e
            raise
        if reply["type"] == "kv_refuse":
            conn.clean = True
            try:
                reason = RefuseReason(reply.get("reason"))
            except ValueError:
                reason = RefuseReason.RESERVE_FAILED
            raise TransferRefused(offer.request_id, reason, str(reply.get("error")))
        if reply["type"] != "kv_accept":
            raise protocol.ProtocolError(f"expected kv_accept or kv_refuse, got {reply['type']!r}")
        skip = reply.get("skip", 0)
        if (
            isinstance(skip, bool)
            or not isinstance(skip, int)
            or not 0 <= skip <= len(offer.block_names)
        ):
            raise protocol.ProtocolError(f"kv_accept skips {skip!r} of {len(offer.block_names)}")
        progress.skip = skip
        progress.state = TransferState.STREAMING

    @classmethod
    async def _reply(cls, conn: _Conn, request_id: str) -> dict:
        return cls._check_answer(await protocol.read_frame(conn.reader), request_id)

    @staticmethod
    def _check_answer(reply: dict, request_id: str) -> dict:
        if reply.get("request_id") != request_id:
            raise protocol.ProtocolError(
                f"answer for {reply.get('request_id')!r} while sending {request_id!r}"
            )
        return reply
