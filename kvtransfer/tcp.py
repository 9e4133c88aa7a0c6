"""``tcp`` backend: asyncio streams, one persistent connection per transfer in flight.

Wire format of one transfer on a connection (control frames are ``tandem.protocol``
frames: 4-byte big-endian length + msgpack map with a ``type``)::

    S -> R  frame  {type: kv_offer, request_id, compat_hash, num_blocks, num_tokens,
                    state_nbytes, payload_nbytes, dtype, shape}
    R -> S  frame  {type: kv_accept, request_id, num_blocks}
              or   {type: kv_refuse, request_id, reason, error}        (connection stays usable)
    S -> R  raw    state_nbytes bytes of msgpack state, then payload_nbytes bytes of the
                   tensor in C order (written in ``chunk_bytes`` pieces; the offer's sizes
                   delimit them, so no per-chunk header is needed)
    R -> S  frame  {type: kv_done, request_id}
              or   {type: kv_failed, request_id, error}   (commit raised; reservation aborted)

After a refuse, done or failed answer the connection carries the next transfer. Any other
failure (timeout, lapsed lease, broken stream) closes it: a half-sent byte stream cannot
be resynchronised. The sender keeps idle connections per destination and opens a new one
when all are busy (at most ``max_connections`` per destination; more transfers wait for
a slot inside their timeout). A reused connection that turns out dead before the offer was
answered is replaced once: nothing can have been reserved on it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

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
    ) -> None:
        self.metrics = TransferMetrics()
        self._inbound = InboundTransfers(compat_hash, callbacks, lease_s, self.metrics)
        self.host, self.port, self.chunk_bytes = host, port, chunk_bytes
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
        try:
            while await self._one(reader, writer):
                pass
        except _CONN_ERRORS as e:
            log.debug("KV connection from %s ended: %r", writer.get_extra_info("peername"), e)
        except asyncio.CancelledError:
            pass  # close() ended it; end quietly (asyncio logs a cancelled handler task)
        finally:
            self._conns.discard(task)
            writer.transport.abort()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one transfer; False when the connection must close."""
        try:
            msg = await protocol.read_frame(reader)
        except asyncio.IncompleteReadError:
            return False  # the sender closed an idle connection
        if msg["type"] != "kv_offer":
            raise protocol.ProtocolError(f"expected kv_offer, got {msg['type']!r}")
        rid = str(msg.get("request_id", ""))
        try:
            offer = Offer.from_dict(msg)
            block_ids = await self._inbound.open(offer, on_expire=writer.transport.abort)
        except (ValueError, TransferRefused) as e:
            reason = e.reason if isinstance(e, TransferRefused) else RefuseReason.BAD_OFFER
            if not isinstance(e, TransferRefused):
                self.metrics.failed += 1
                self.metrics.refused += 1
            writer.write(
                protocol.encode(
                    {
                        "type": "kv_refuse",
                        "request_id": rid,
                        "reason": reason.value,
                        "error": str(e),
                    }
                )
            )
            await writer.drain()
            return True
        try:
            writer.write(
                protocol.encode(
                    {"type": "kv_accept", "request_id": rid, "num_blocks": len(block_ids)}
                )
            )
            await writer.drain()
            state_bytes = await reader.readexactly(offer.state_nbytes)
            buf = bytearray(offer.payload_nbytes)
            view = memoryview(buf)
            for start in range(0, len(buf), self.chunk_bytes):
                piece = await reader.readexactly(min(self.chunk_bytes, len(buf) - start))
                view[start : start + len(piece)] = piece
        except BaseException as e:
            await self._inbound.drop(rid, f"connection lost mid-payload: {e!r}")
            raise
        try:
            state = wire.unpack_state(state_bytes)
            payload = wire.tensor_from_bytes(buf, offer.dtype, offer.shape)
        except ValueError as e:
            await self._inbound.drop(rid, str(e))
            reply = {"type": "kv_failed", "request_id": rid, "error": f"undecodable bytes: {e}"}
        else:
            try:
                await self._inbound.finish(rid, state, payload)
                reply = {"type": "kv_done", "request_id": rid}
            except TransferError as e:
                reply = {"type": "kv_failed", "request_id": rid, "error": str(e)}
        writer.write(protocol.encode(reply))
        await writer.drain()
        return True


# ---- sender --------------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False
    clean: bool = False  # True only between transfers (stream in sync)

    def alive(self) -> bool:
        return not self.writer.transport.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.transport.abort()


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
    ) -> None:
        super().__init__(compat_hash, timeout_s)
        if chunk_bytes < 1 or max_connections < 1:
            raise ValueError("chunk_bytes and max_connections must be >= 1")
        self.chunk_bytes = chunk_bytes
        self.max_connections = max_connections
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
        data = wire.tensor_to_bytes(payload)
        slots = self._slots.setdefault(dest, asyncio.Semaphore(self.max_connections))
        async with slots:
            try:
                await self._over(
                    await self._checkout(dest), dest, offer, state_bytes, data, progress
                )
            except _StaleConnection:
                await self._over(
                    await self._connect(dest), dest, offer, state_bytes, data, progress
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
        return _Conn(reader, writer)

    async def _over(
        self,
        conn: _Conn,
        dest: str,
        offer: Offer,
        state_bytes: bytes,
        data: memoryview,
        progress: Progress,
    ) -> None:
        """One transfer on ``conn``; it goes back to the idle list only if it ends in sync."""
        conn.clean = False
        try:
            await self._handshake(conn, offer, progress)
            conn.writer.write(state_bytes)
            for piece in wire.chunks(data, self.chunk_bytes):
                conn.writer.write(piece)
                await conn.writer.drain()
            await conn.writer.drain()
            progress.state = TransferState.COMMITTING
            reply = await self._reply(conn, offer.request_id)
            conn.clean = True
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
            conn.writer.write(protocol.encode({"type": "kv_offer", **offer.to_dict()}))
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
        progress.state = TransferState.STREAMING

    @staticmethod
    async def _reply(conn: _Conn, request_id: str) -> dict:
        reply = await protocol.read_frame(conn.reader)
        if reply.get("request_id") != request_id:
            raise protocol.ProtocolError(
                f"answer for {reply.get('request_id')!r} while sending {request_id!r}"
            )
        return reply
