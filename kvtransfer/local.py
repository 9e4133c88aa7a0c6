"""``local`` backend: both ends in one process, no sockets.

The sender hands its tensor to the receiver object directly, through the same handshake
and callbacks as every other backend: ``offer`` (reserve, lease starts), ``deliver``
(commit). Used for colocated engines and as the reference in tests. The payload is not
copied (the receiver's ``commit`` copies it into its blocks); the state goes through
msgpack, so the receiver never shares a list with the sender and a state that would not
survive the wire fails here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kvtransfer import wire
from kvtransfer.base import (
    KVReceiver,
    KVSender,
    Progress,
    ReceiverCallbacks,
    TransferError,
    TransferMetrics,
    TransferState,
)
from kvtransfer.inbound import InboundTransfers
from kvtransfer.wire import Offer


class LocalKVReceiver(KVReceiver):
    name = "local"

    def __init__(
        self,
        compat_hash: str,
        callbacks: ReceiverCallbacks,
        lease_s: float = 30.0,
        address: str = "local",
    ) -> None:
        self.metrics = TransferMetrics()
        self._inbound = InboundTransfers(compat_hash, callbacks, lease_s, self.metrics)
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    async def close(self) -> None:
        await self._inbound.close()

    def transfers(self) -> dict[str, TransferState]:
        return self._inbound.states()

    async def offer(self, offer: Offer) -> list[int]:
        """Handshake: the reserved block ids, or ``TransferRefused``. Starts the lease."""
        return await self._inbound.open(offer)

    async def accept(self, offer: Offer) -> int:
        """Handshake that may skip blocks held here: how many leading blocks the sender
        must leave out of the payload (``InboundTransfers.accept``)."""
        _, skip = await self._inbound.accept(offer)
        return skip

    async def deliver(self, request_id: str, state: dict[str, Any], payload: torch.Tensor) -> None:
        """The bytes of an accepted offer: commit them (``TransferError`` on failure)."""
        await self._inbound.finish(request_id, state, payload)

    async def cancel(self, request_id: str, why: str = "sender cancelled") -> None:
        """The sender gives up before delivering: free the reservation."""
        await self._inbound.drop(request_id, why)


class LocalKVSender(KVSender):
    name = "local"

    def __init__(
        self,
        compat_hash: str,
        peers: Iterable[LocalKVReceiver] = (),
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__(compat_hash, timeout_s)
        self._peers: dict[str, LocalKVReceiver] = {}
        for peer in peers:
            self.add_peer(peer)

    def add_peer(self, receiver: LocalKVReceiver) -> None:
        """Make ``receiver`` reachable as ``dest=receiver.address``."""
        self._peers[receiver.address] = receiver

    async def _transfer(
        self,
        dest: str,
        offer: Offer,
        state_bytes: bytes,
        payload: torch.Tensor,
        progress: Progress,
    ) -> None:
        receiver = self._peers.get(dest)
        if receiver is None:
            raise TransferError(
                offer.request_id, f"no local receiver at {dest!r}; known: {sorted(self._peers)}"
            )
        progress.skip = await receiver.accept(offer)
        progress.state = TransferState.STREAMING
        try:
            state = wire.unpack_state(state_bytes)
            progress.state = TransferState.COMMITTING
            await receiver.deliver(offer.request_id, state, payload[:, :, progress.skip :])
        except BaseException:
            # deliver aborts the reservation on any failure (also when cancelled by our
            # timeout): nothing was committed, unlike a lost DONE over a network.
            progress.state = TransferState.FAILED
            await receiver.cancel(offer.request_id)
            raise
        progress.state = TransferState.DONE
