"""The payload leg of a socket transfer: how state and K/V bytes travel once an offer is
accepted. The control plane (offer, accept/refuse, done/failed frames on an asyncio
connection, ``kvtransfer.tcp``) is the same for every leg; the leg is a strategy object.

Each connection has its own channel object on both ends, made when the connection opens and
closed with it, so whatever a leg keeps per peer (an NCCL communicator) lives exactly as
long as the connection, and one connection carries one transfer at a time::

    sender channel                                  receiver channel
    open(reader, writer)      (after connect)  ───► on_frame(...)   (set-up frames, if any)
    ... OFFER / ACCEPT on the connection ...
    send(..., progress) -> answer frame        ───► receive(...) -> (state bytes, payload)
    close()                   (connection closed)   close()

Contract of ``send``: move ``state_bytes`` and the payload, then return the receiver's answer
frame (``kv_done`` / ``kv_failed``). Set ``progress.state = COMMITTING`` as soon as the
receiver may hold every byte (from then on a failure is ``maybe_committed``). Any exception
means the connection is out of sync and gets closed.

Contract of ``receive``: return the state bytes and the payload tensor (dtype and shape of
the offer). ``PayloadError``: the payload failed but the control stream is in sync (the
transfer fails with ``kv_failed``; the connection goes on only while ``usable``). Any other
exception: the payload will never complete (the connection is closed).

``usable`` turns False when the leg can carry no further transfer (a poisoned communicator):
its connection is then closed after the current answer.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any, ClassVar

import torch

from kvtransfer import wire
from kvtransfer.base import Progress, TransferState
from kvtransfer.wire import Offer
from tandem import protocol


class PayloadError(Exception):
    """The payload leg failed while the control connection stayed in sync."""


class SenderChannel(abc.ABC):
    """Sender half of the payload leg of one connection."""

    name: ClassVar[str] = "abstract"

    def __init__(self) -> None:
        self.usable = True

    async def open(  # noqa: B027 (optional hook)
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Set up after the connection opened, before its first offer."""

    @abc.abstractmethod
    async def send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        offer: Offer,
        state_bytes: bytes,
        payload: torch.Tensor,
        progress: Progress,
    ) -> dict[str, Any]:
        """Move state and payload after ACCEPT; return the receiver's answer frame."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """The connection is closing: release what the leg holds."""


class ReceiverChannel(abc.ABC):
    """Receiver half of the payload leg of one connection."""

    name: ClassVar[str] = "abstract"

    def __init__(self) -> None:
        self.usable = True

    async def on_frame(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: dict[str, Any]
    ) -> bool:
        """A control frame that is not an offer: True if this leg handled it."""
        return False

    @abc.abstractmethod
    async def receive(
        self, reader: asyncio.StreamReader, offer: Offer
    ) -> tuple[bytes, torch.Tensor]:
        """The state bytes and the payload of an accepted offer."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """The connection is closing: release what the leg holds."""


class TcpSenderChannel(SenderChannel):
    """State and payload as one byte stream on the control connection itself."""

    name = "tcp"

    def __init__(self, chunk_bytes: int = wire.CHUNK_BYTES) -> None:
        super().__init__()
        self.chunk_bytes = chunk_bytes

    async def send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        offer: Offer,
        state_bytes: bytes,
        payload: torch.Tensor,
        progress: Progress,
    ) -> dict[str, Any]:
        data = wire.tensor_to_bytes(payload)
        writer.write(state_bytes)
        for piece in wire.chunks(data, self.chunk_bytes):
            writer.write(piece)
            await writer.drain()
        await writer.drain()
        progress.state = TransferState.COMMITTING  # the last byte is on its way
        return await protocol.read_frame(reader)


class TcpReceiverChannel(ReceiverChannel):
    name = "tcp"

    def __init__(self, chunk_bytes: int = wire.CHUNK_BYTES) -> None:
        super().__init__()
        self.chunk_bytes = chunk_bytes

    async def receive(
        self, reader: asyncio.StreamReader, offer: Offer
    ) -> tuple[bytes, torch.Tensor]:
        state_bytes = await reader.readexactly(offer.state_nbytes)
        buf = bytearray(offer.payload_nbytes)
        view = memoryview(buf)
        for start in range(0, len(buf), self.chunk_bytes):
            piece = await reader.readexactly(min(self.chunk_bytes, len(buf) - start))
            view[start : start + len(piece)] = piece
        try:
            return state_bytes, wire.tensor_from_bytes(buf, offer.dtype, offer.shape)
        except ValueError as e:
            raise PayloadError(f"undecodable bytes: {e}") from None
