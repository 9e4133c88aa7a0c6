"""The receiver's state machine: reservations in flight, their leases, every ``abort``.

Each backend's receiver owns one ``InboundTransfers`` and feeds it three events::

    open(offer)              -> block ids (OFFERED -> STREAMING, lease starts)
                                or TransferRefused (nothing held)
    accept(offer)            -> (block ids, skip): the same, for a receiver that may hold
                                the offer's first ``skip`` named blocks (prefix caching)
    finish(rid, state, pl)   -> commit (STREAMING -> COMMITTING -> gone; TransferError and
                                abort if commit raises or the lease already lapsed)
    drop(rid, why)           -> abort (the payload will never complete)

A lapsed lease aborts on its own (and calls the backend's ``on_expire``, which closes the
stalled connection). An entry leaves the table exactly once, and whoever removes it makes
the one ``abort`` call (or the commit), so no reservation is freed twice or kept forever.
Everything runs on one event loop: the checks before each ``await`` are atomic.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from kvtransfer.base import (
    ReceiverCallbacks,
    RefuseReason,
    TransferError,
    TransferMetrics,
    TransferRefused,
    TransferState,
    call,
)
from kvtransfer.wire import Offer
from tandem.kvcache.block_pool import NoFreeBlocksError

log = logging.getLogger("tandem.kvtransfer")


@dataclass
class _Inbound:
    offer: Offer
    started: float
    state: TransferState = TransferState.OFFERED
    block_ids: list[int] = field(default_factory=list)
    skip: int = 0
    lease: asyncio.TimerHandle | None = None
    on_expire: Callable[[], None] | None = None


class InboundTransfers:
    """Transfers in flight at one receiver, keyed by request id (at most one per id)."""

    def __init__(
        self,
        compat_hash: str,
        callbacks: ReceiverCallbacks,
        lease_s: float,
        metrics: TransferMetrics,
    ) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.compat_hash = compat_hash
        self.callbacks = callbacks
        self.lease_s = lease_s
        self.metrics = metrics
        self._inbound: dict[str, _Inbound] = {}
        self._aborts: set[asyncio.Task[None]] = set()  # started by lapsed leases
        self._closed = False

    def states(self) -> dict[str, TransferState]:
        return {rid: entry.state for rid, entry in self._inbound.items()}

    async def close(self) -> None:
        """Refuse new offers; abort every reservation whose payload has not arrived.
        Call it after the backend stopped its I/O (commits in progress finish on their own)."""
        self._closed = True
        for rid, entry in list(self._inbound.items()):
            if entry.state is TransferState.STREAMING:
                await self.drop(rid, "receiver closed")
            elif entry.state is TransferState.OFFERED:
                del self._inbound[rid]  # open() sees it gone and aborts its reservation
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)

    async def open(self, offer: Offer, on_expire: Callable[[], None] | None = None) -> list[int]:
        """Check ``offer``, reserve its blocks and start the lease; ``on_expire`` runs if it
        lapses (the backend closes the stalled connection). ``TransferRefused`` otherwise.
        For a sender that cannot skip blocks: the offer's names are ignored."""
        block_ids, _ = await self._open(offer, on_expire, use_names=False)
        return block_ids

    async def accept(
        self, offer: Offer, on_expire: Callable[[], None] | None = None
    ) -> tuple[list[int], int]:
        """As ``open``, and if the offer names blocks and the callbacks have
        ``reserve_cached``, skip the leading ones held here: returns the ids reserved for
        the blocks after them, and how many were skipped (the payload then comes without
        them: ``offer.skip(skip)``)."""
        return await self._open(offer, on_expire, use_names=True)

    async def _open(
        self, offer: Offer, on_expire: Callable[[], None] | None, use_names: bool
    ) -> tuple[list[int], int]:
        rid = offer.request_id
        if self._closed:
            self._refuse(rid, RefuseReason.CLOSED, "receiver is closed")
        if offer.compat_hash != self.compat_hash:
            self._refuse(
                rid,
                RefuseReason.INCOMPATIBLE,
                f"KV layout mismatch for {rid!r}: sender {offer.compat_hash}, receiver "
                f"{self.compat_hash} (model, dtype, block size, KV heads, head dim or layers differ)",
            )
        try:
            offer.check()
        except ValueError as e:
            self._refuse(rid, RefuseReason.BAD_OFFER, f"bad offer for {rid!r}: {e}")
        if rid in self._inbound:
            self._refuse(
                rid, RefuseReason.DUPLICATE, f"a transfer of {rid!r} is already in flight here"
            )
        # Claim the id before awaiting reserve, so a concurrent duplicate is refused.
        entry = self._inbound[rid] = _Inbound(offer, started=time.monotonic())
        reserve_cached = getattr(self.callbacks, "reserve_cached", None)
        skip = 0
        try:
            if use_names and offer.block_names and reserve_cached is not None:
                skip, ids = await call(
                    reserve_cached, rid, offer.num_tokens, list(offer.block_names)
                )
                block_ids = list(ids)
            else:
                block_ids = list(await call(self.callbacks.reserve, rid, offer.num_tokens))
        except NoFreeBlocksError as e:
            self._forget(rid, entry)
            self._refuse(rid, RefuseReason.NO_FREE_BLOCKS, f"no free blocks for {rid!r}: {e}")
        except Exception as e:
            self._forget(rid, entry)
            self._refuse(rid, RefuseReason.RESERVE_FAILED, f"reserve of {rid!r} failed: {e}")
        except BaseException:  # cancelled: reserve is all or nothing, so nothing is held
            self._forget(rid, entry)
            raise
        if self._inbound.get(rid) is not entry:  # closed while reserving
            await self._abort(rid, block_ids)
            self._refuse(rid, RefuseReason.CLOSED, "receiver closed while reserving")
        if (
            isinstance(skip, bool)
            or not isinstance(skip, int)
            or not 0 <= skip <= len(offer.block_names)
            or len(block_ids) != offer.num_blocks - skip
        ):
            self._forget(rid, entry)
            await self._abort(rid, block_ids)
            self._refuse(
                rid,
                RefuseReason.RESERVE_FAILED,
                f"reserve gave {len(block_ids)} blocks (skipping {skip!r}) for {rid!r}, "
                f"the offer has {offer.num_blocks}",
            )
        entry.block_ids = block_ids
        entry.skip = skip
        entry.state = TransferState.STREAMING
        entry.on_expire = on_expire
        entry.lease = asyncio.get_running_loop().call_later(self.lease_s, self._expire, rid, entry)
        return list(block_ids), skip

    async def finish(self, rid: str, state: dict[str, Any], payload: torch.Tensor) -> None:
        """All bytes arrived: commit. ``TransferError`` if the lease lapsed or commit raised
        (the reservation is then aborted)."""
        entry = self._inbound.get(rid)
        if entry is None or entry.state is not TransferState.STREAMING:
            raise TransferError(
                rid, f"lease of {rid!r} lapsed before its payload arrived; its blocks were freed"
            )
        entry.state = TransferState.COMMITTING  # the lease no longer applies
        if entry.lease is not None:
            entry.lease.cancel()
        try:
            await call(self.callbacks.commit, rid, list(entry.block_ids), payload, state)
        except BaseException as e:
            self._forget(rid, entry)
            self.metrics.failed += 1
            await self._abort(rid, entry.block_ids)
            if isinstance(e, Exception):
                raise TransferError(rid, f"commit of {rid!r} failed: {e}") from e
            raise
        self._forget(rid, entry)
        moved = entry.offer.skip(entry.skip)
        self.metrics.skipped_blocks += entry.skip
        self.metrics.record_ok(
            moved.state_nbytes + moved.payload_nbytes, time.monotonic() - entry.started
        )

    async def drop(self, rid: str, why: str) -> None:
        """The payload will never complete (connection lost, receiver closing): abort the
        reservation. A no-op unless ``rid`` is streaming (already expired or committing)."""
        entry = self._inbound.get(rid)
        if entry is None or entry.state is not TransferState.STREAMING:
            return
        self._forget(rid, entry)
        if entry.lease is not None:
            entry.lease.cancel()
        self.metrics.failed += 1
        log.warning("KV transfer of %r dropped (%s); reservation freed", rid, why)
        await self._abort(rid, entry.block_ids)

    def _expire(self, rid: str, entry: _Inbound) -> None:
        if self._inbound.get(rid) is not entry or entry.state is not TransferState.STREAMING:
            return
        self._forget(rid, entry)
        self.metrics.failed += 1
        log.warning(
            "KV transfer of %r: lease of %ss lapsed mid-payload; freeing it", rid, self.lease_s
        )
        # A plain abort runs now, so the id is free again the moment the lease lapses.
        pending = self._start_abort(rid, entry.block_ids)
        if pending is not None:
            task = asyncio.ensure_future(self._finish_abort(rid, entry.block_ids, pending))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)
        if entry.on_expire is not None:
            entry.on_expire()

    async def _abort(self, rid: str, block_ids: list[int]) -> None:
        pending = self._start_abort(rid, block_ids)
        if pending is not None:
            await self._finish_abort(rid, block_ids, pending)

    def _start_abort(self, rid: str, block_ids: list[int]) -> Awaitable[Any] | None:
        try:
            result = self.callbacks.abort(rid, list(block_ids))
        except Exception:  # a failing abort leaks blocks: loud, but the receiver goes on
            log.exception("abort callback failed for %r (blocks %s may leak)", rid, block_ids)
            return None
        return result if inspect.isawaitable(result) else None

    async def _finish_abort(self, rid: str, block_ids: list[int], pending: Awaitable[Any]) -> None:
        try:
            await pending
        except Exception:
            log.exception("abort callback failed for %r (blocks %s may leak)", rid, block_ids)

    def _forget(self, rid: str, entry: _Inbound) -> None:
        if self._inbound.get(rid) is entry:
            del self._inbound[rid]

    def _refuse(self, rid: str, reason: RefuseReason, message: str) -> NoReturn:
        self.metrics.failed += 1
        self.metrics.refused += 1
        raise TransferRefused(rid, reason, message)
