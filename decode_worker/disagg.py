"""Decode worker in disaggregated mode: receive KV from prefill workers, then decode.

A request's life in this process:

1. The router sends ``expect`` {request_id} on its connection, before it submits the
   prompt to a prefill worker: the tokens of that request will go back on this connection.
2. A prefill worker offers the request's KV (kvtransfer): ``reserve`` takes blocks from the
   device tier (refused if there are none) -- with prefix caching, the leading blocks
   already cached here are shared instead and the sender leaves them out of the payload
   (``reserve_cached``) --, the bytes stream in under a lease, ``commit``
   writes them and adopts the request as RUNNING with its state (tokens so far, sampling
   params, MLFQ queue); ``abort`` frees a reservation that did not complete.
3. From the next iteration on it decodes like any request; its tokens go to the router.
4. ``abort`` from the router (client gone, stop string) works as in colocated mode; an
   abort that arrives before the KV does is remembered, and the late transfer is refused.

Receiver callbacks run on the asyncio thread and are marshalled to the engine thread
(``in_engine``), which alone touches the engine. Tokens of a request whose ``expect`` has
not arrived yet (two different sockets) are buffered and flushed when it does.

Live migration (with a ``kv_sender``): ``migrate`` from the router moves one of this
worker's running requests to another decode worker in stages (``migration_out``); KV
transfers whose id is a migration stage's are another worker's request arriving here
(``migration_in``), adopted like a handoff once its final stage commits. ``unexpect``
withdraws an ``expect`` of a migration the router gave up (no cancellation is remembered).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from decode_worker.migration_in import MigrationIn
from decode_worker.migration_out import MigrationOut
from decode_worker.service import WorkerService, _Conn
from tandem import protocol
from tandem.migration import TransferId
from tandem.protocol import Expect, Message, Migrate, MigrateFailed, TokenItem, Tokens, Unexpect
from tandem.request_state import request_from_state

log = logging.getLogger("tandem.decode_worker")

EXPECT_TTL_S = 120.0  # an expectation whose KV never came (prefill fell back) is dropped


class DecodeWorkerService(WorkerService):
    def __init__(
        self,
        engine: Any,
        kv_receiver_factory: Any,
        kv_sender: Any = None,
        migration_lease_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        """``kv_receiver_factory(callbacks) -> KVReceiver`` (started in ``start``);
        ``kv_sender``: a ``KVSender`` for migrating requests out (None: this worker only
        receives). ``migration_lease_s``: how long an incoming migration's reservation
        waits for its next stage."""
        super().__init__(engine, role="decode", **kwargs)
        self.kv_receiver = kv_receiver_factory(self)
        self.migration_in = MigrationIn(self, migration_lease_s)
        self.migration_out = MigrationOut(self, kv_sender) if kv_sender is not None else None
        self._expected: dict[str, tuple[_Conn, float]] = {}  # engine thread
        self._buffered: dict[str, list[TokenItem]] = {}
        self._buffered_at: dict[str, float] = {}
        self._cancelled: dict[str, float] = {}

    async def start(self) -> int:
        await self.kv_receiver.start()
        return await super().start()

    def extra_hello(self) -> dict[str, Any]:
        return {
            "kv_address": self.kv_address,
            "migration": self.migration_out is not None,
        }

    @property
    def kv_address(self) -> str:
        address = self.kv_receiver.address
        host, _, port = address.rpartition(":")
        return f"{self.advertise_host}:{port}" if host in ("0.0.0.0", "") else address

    def info(self):
        info = super().info()
        info.kv_address = self.kv_address
        return info

    # ------------------------------------------------------------------ router messages
    def on_message(self, conn: _Conn, msg: Message) -> None:
        if isinstance(msg, Expect):
            self._post(lambda rid=str(msg.request_id): self._expect(conn, rid))
        elif isinstance(msg, Unexpect):
            self._post(lambda rid=str(msg.request_id): self._unexpect(conn, rid))
        elif isinstance(msg, Migrate) and self.migration_out is not None:
            self.migration_out.start(conn, msg)
        elif isinstance(msg, Migrate):
            fail = MigrateFailed(msg.request_id, "no KV sender here")
            self._post(lambda: self._send(conn, fail))
        else:
            super().on_message(conn, msg)

    def on_bad_message(self, conn: _Conn, e: protocol.BadMessage) -> None:
        if e.kind == Migrate.TYPE:  # answered, so the router's move ends at once
            fail = MigrateFailed(e.request_id, f"bad migrate: {e}")
            self._post(lambda: self._send(conn, fail))
        else:
            super().on_bad_message(conn, e)

    def _expect(self, conn: _Conn, rid: str) -> None:
        if rid in self._buffered:  # its KV (and maybe all its tokens) came first
            items = self._buffered.pop(rid)
            self._buffered_at.pop(rid, None)
            if self.engine.scheduler.requests.get(rid) is not None:
                self._own(conn, rid)
            if items:
                self._send(conn, Tokens(tuple(items)))
            if any(item.finished for item in items):
                self._owner.pop(rid, None)
                conn.requests.discard(rid)
            return
        self._expected[rid] = (conn, time.monotonic())
        self._gc()

    def _unexpect(self, conn: _Conn, rid: str) -> None:
        """The router gave up a migration to here: drop its expectation and reservation."""
        expected = self._expected.get(rid)
        if expected is not None and expected[0] is conn:
            del self._expected[rid]
        self.migration_in.cancel(rid)

    def _own(self, conn: _Conn, rid: str) -> None:
        self._owner[rid] = conn
        conn.requests.add(rid)

    def _abort(self, request_ids: list[str]) -> None:
        now = time.monotonic()
        for rid in request_ids:
            if self._expected.pop(rid, None) is not None:
                self._cancelled[rid] = now  # its KV may still be on the way
            self._buffered.pop(rid, None)
            self.migration_in.cancel(rid)
            if self.migration_out is not None:
                self.migration_out.on_abort(rid)
        super()._abort(request_ids)

    def on_unowned(self, request_id: str, item: TokenItem) -> None:
        if request_id in self._buffered:
            self._buffered[request_id].append(item)

    def on_connection_closed(self, conn: _Conn) -> None:
        """Its pending expectations are cancelled too: their KV, if it still comes, is refused."""
        now = time.monotonic()
        for rid in [r for r, (c, _) in self._expected.items() if c is conn]:
            del self._expected[rid]
            self._cancelled[rid] = now
        super().on_connection_closed(conn)

    def _gc(self) -> None:
        """Expectations live as long as their router connection (which aborts them); only
        remembered cancellations and unclaimed buffers expire."""
        cutoff = time.monotonic() - EXPECT_TTL_S
        for rid in [r for r, t in self._cancelled.items() if t < cutoff]:
            del self._cancelled[rid]
        for rid in [r for r, t in self._buffered_at.items() if t < cutoff]:
            # Nobody claimed it: stop decoding for nobody and free its blocks.
            self._buffered.pop(rid, None)
            del self._buffered_at[rid]
            self.engine.abort_request(rid)

    def after_step(self, outputs: list[Any]) -> None:
        if self._buffered_at:
            self._gc()
        if self.migration_out is not None:
            self.migration_out.after_step()

    def on_tick(self) -> None:
        self.migration_in.tick()

    # ------------------------------------------------------------------ KV receiver callbacks
    async def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        tid = TransferId.parse(request_id)
        if tid is not None:
            return await self.in_engine(lambda: self.migration_in.reserve(tid, num_tokens))
        return await self.in_engine(lambda: self._reserve(request_id, num_tokens))

    def _reserve(self, rid: str, num_tokens: int) -> list[int]:
        if rid in self._cancelled:
            raise ValueError(f"request {rid!r} was aborted by the router")
        return self.engine.reserve_import(rid, num_tokens)

    async def reserve_cached(
        self, request_id: str, num_tokens: int, block_names: list[bytes]
    ) -> tuple[int, list[int]]:
        """``reserve`` that shares the leading blocks cached here (prefix caching): the
        sender then sends only the rest."""
        tid = TransferId.parse(request_id)
        if tid is not None:
            return await self.in_engine(
                lambda: self.migration_in.reserve_cached(tid, num_tokens, block_names)
            )
        return await self.in_engine(
            lambda: self._reserve_cached(request_id, num_tokens, block_names)
        )

    def _reserve_cached(
        self, rid: str, num_tokens: int, names: list[bytes]
    ) -> tuple[int, list[int]]:
        if rid in self._cancelled:
            raise ValueError(f"request {rid!r} was aborted by the router")
        if not hasattr(self.engine, "reserve_import_cached"):  # a fake engine
            return 0, self.engine.reserve_import(rid, num_tokens)
        return self.engine.reserve_import_cached(rid, num_tokens, names)

    async def commit(
        self, request_id: str, block_ids: list[int], payload: Any, state: dict[str, Any]
    ) -> None:
        tid = TransferId.parse(request_id)
        if tid is not None:
            fn = lambda: self.migration_in.commit(tid, block_ids, payload, state)  # noqa: E731
        else:
            fn = lambda: self._commit(request_id, block_ids, payload, state)  # noqa: E731
        await self.in_engine(fn)

    def _commit(self, rid: str, block_ids: list[int], payload: Any, state: dict[str, Any]) -> None:
        self.claimable(rid)
        request = request_from_state(state, time.monotonic())
        num_computed = int(state["num_computed_tokens"])
        self.engine.commit_import(
            request, block_ids, payload, num_computed, state.get("policy_state")
        )
        self.adopt(rid)

    def claimable(self, rid: str) -> None:
        """Engine thread: ``ValueError`` unless a router may still want ``rid`` here."""
        if rid in self._cancelled:
            raise ValueError(f"request {rid!r} was aborted by the router")
        expected = self._expected.get(rid)
        if expected is not None and expected[0].closed:
            raise ValueError(f"the router that expected {rid!r} is gone")

    def adopt(self, rid: str) -> None:
        """Engine thread: ``rid`` runs here now; its tokens go to the router that expects
        it, or are buffered until that router's ``expect`` arrives."""
        expected = self._expected.pop(rid, None)
        if expected is not None:
            self._own(expected[0], rid)
        else:
            self._buffered[rid] = []  # the router's expect is still on its way
            self._buffered_at[rid] = time.monotonic()

    async def abort(self, request_id: str, block_ids: list[int]) -> None:
        tid = TransferId.parse(request_id)
        if tid is not None:
            await self.in_engine(lambda: self.migration_in.abort(tid))
        else:
            await self.in_engine(lambda: self.engine.abort_import(request_id))

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        m = self.kv_receiver.metrics
        s.update(
            kv_in_transfers=m.ok,
            kv_in_failed=m.failed,
            kv_in_bytes=m.bytes,
            kv_in_seconds=m.seconds,
            kv_in_skipped_blocks=m.skipped_blocks,
            **self.migration_in.stats(),
        )
        if self.migration_out is not None:
            s.update(self.migration_out.as_stats())
        return s

    async def shutdown(self) -> None:
        if self.migration_out is not None:
            await self.migration_out.close()
        await self.kv_receiver.close()
        await super().shutdown()
