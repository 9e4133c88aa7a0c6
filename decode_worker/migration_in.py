"""Destination side of live migration: a request arrives in stages and resumes here.

Each stage is a KV transfer whose id is a ``TransferId`` (``tandem.migration.plan``), so
the decode worker's receiver callbacks hand those to this class instead of the handoff
path. All methods run on the engine thread (the service marshals them there).

1. Stage 0 ``reserve`` opens the migration's pending import (``MigrationInbox``); every
   later stage extends it. A copy stage's ``commit`` writes its blocks and waits.
2. The final stage's ``commit`` writes the last blocks, turns the whole import into the
   request's block table and adopts the request as RUNNING with its state (tokens so far,
   sampling params and seed, MLFQ queue and service). Its tokens then go to the router
   that sent ``expect`` for it (buffered until the ``expect`` arrives, as for a handoff).
3. Any failure frees the whole reservation once: a stage's transfer failing (the receiver
   calls ``abort``), the router cancelling (``cancel``: the request ended, or the source
   gave up and the router sent ``unexpect``), or the source going silent between stages
   for ``lease_s`` (``tick`` expires it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tandem import env
from tandem.migration import Fault, MigrationInbox, TransferId
from tandem.request_state import request_from_state

log = logging.getLogger("tandem.decode_worker")


class MigrationIn:
    def __init__(self, service: Any, lease_s: float) -> None:
        """``service``: the DecodeWorkerService (``engine``, ``claimable``, ``adopt``)."""
        self.service = service
        self.engine = service.engine
        self.inbox = MigrationInbox(self.engine.scheduler.device_kv, lease_s)

    def reserve(self, tid: TransferId, num_tokens: int) -> list[int]:
        return self._reserve(tid, num_tokens, [])

    def reserve_cached(
        self, tid: TransferId, num_tokens: int, block_names: list[bytes]
    ) -> tuple[int, list[int]]:
        """(blocks of stage ``tid`` shared from this worker's prefix cache, ids for the
        rest): only stage 0 shares, the blocks at the start of the request."""
        held: list[int] = []
        sched = self.engine.scheduler
        if tid.index == 0 and getattr(sched, "caching", False):
            held = sched.device_kv.match_prefix(
                block_names, num_tokens // sched.device_kv.block_size
            )
        return len(held), self._reserve(tid, num_tokens, held)

    def _reserve(self, tid: TransferId, num_tokens: int, held: list[int]) -> list[int]:
        rid = tid.request_id
        if rid in self.engine.scheduler.requests:
            raise ValueError(f"request {rid!r} already runs on this worker")
        self.service.claimable(rid)
        entry = self.inbox.get(rid)
        fault = entry.fault if entry is not None and tid.index > 0 else None
        if tid.final and fault is not None and fault.hits("dest", tid.index, True, "final"):
            raise ValueError(f"injected fault {fault}: the final stage is refused")
        return self.inbox.reserve(tid, num_tokens, time.monotonic(), held)

    def commit(self, tid: TransferId, block_ids: list[int], payload: Any, state: dict) -> None:
        """All or nothing, as the receiver contract asks: on error the reservation is
        still pending (the receiver then calls ``abort``)."""
        rid = tid.request_id
        entry = self.inbox.check(tid)  # open, and this is the stage it expects
        fault = self._fault(state) if tid.index == 0 else entry.fault
        if not tid.final:
            if fault is not None and fault.hits("dest", tid.index, False):
                raise ValueError(f"injected fault {fault}: commit of stage {tid.index} failed")
            self.engine.runner.scatter_blocks(block_ids, payload)
            self.inbox.stage_done(tid, time.monotonic(), fault)
            return
        self.service.claimable(rid)
        request = request_from_state(state, time.monotonic())
        if fault is not None and fault.hits("dest", tid.index, True, "commit"):
            self.engine.runner.scatter_blocks(block_ids, payload)
            raise ValueError(f"injected fault {fault}: the final commit failed")
        self.engine.commit_import(
            request,
            block_ids,
            payload,
            int(state["num_computed_tokens"]),
            state.get("policy_state"),
        )
        self.inbox.finish(tid)
        self.service.adopt(rid)

    def abort(self, tid: TransferId) -> None:
        if self.inbox.abort(tid.request_id, tid.migration_id):
            log.info("migration %s aborted; its reservation was freed", tid)

    def cancel(self, request_id: str) -> None:
        """The router ended the request or gave the migration up: free its reservation."""
        self.inbox.abort(request_id)

    def tick(self) -> None:
        for rid in self.inbox.expire(time.monotonic()):
            log.warning("migration of %r: the source went silent; reservation freed", rid)

    @staticmethod
    def _fault(state: dict) -> Fault | None:
        text = (state.get("migration") or {}).get("fault")
        if text and not env.migration_faults_enabled():
            raise ValueError("migration fault injection is off (TANDEM_MIGRATION_FAULTS)")
        return Fault.parse(text)

    def stats(self) -> dict[str, Any]:
        i = self.inbox
        return {
            "migrations_in_committed": i.committed,
            "migrations_in_aborted": i.aborted,
            "migrations_in_expired": i.expired,
            "migration_reserved_blocks": i.reserved_blocks,
        }
