"""The destination's migrations in progress: one growing reservation each, and its expiry.

A migration arrives as several KV transfers (``plan``). The destination keeps ONE pending
import per migrating request in its device ``KVCacheManager``: stage 0 reserves it
(``reserve_import``), every later stage extends it (``extend_import``), the final commit
turns all of it into the request's table (the caller's ``commit_import``), and an abort
frees all of it (``abort_import``). So an abort at any stage frees every block of the
migration, exactly once.

Between stages no transfer is in flight, so no transfer lease protects the reservation:
``expire(now)`` frees every migration whose source has been silent for ``lease_s`` (it
died, or gave up without telling anyone). A stage that arrives for a migration this
inbox no longer knows (expired, aborted, superseded) is refused.

Identity: a migration is (request id, migration id). Callbacks of a stale migration id
(a late abort of an earlier attempt) never touch the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.kvcache import KVCacheManager
from tandem.migration.plan import Fault, TransferId


class UnknownMigration(ValueError):
    """A stage for a migration that is not (or no longer) open here."""


@dataclass
class InboundMigration:
    request_id: str
    migration_id: int
    touched: float  # last reserve or stage commit (the silence clock)
    next_index: int = 0  # the stage index expected next
    in_flight: bool = False  # a stage is between reserve and commit (its transfer lease rules)
    fault: Fault | None = None  # test-only, from stage 0's state


class MigrationInbox:
    def __init__(
        self, kv: KVCacheManager, lease_s: float, on_free: Callable[[str], None] | None = None
    ) -> None:
        """``on_free(request_id)`` is told of every migration freed here by an abort or
        an expiry (not of committed ones)."""
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.kv, self.lease_s = kv, lease_s
        self._open: dict[str, InboundMigration] = {}
        self._on_free = on_free
        self.committed = 0
        self.aborted = 0
        self.expired = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._open

    def get(self, request_id: str) -> InboundMigration | None:
        return self._open.get(request_id)

    @property
    def reserved_blocks(self) -> int:
        return sum(self.kv.pending_import_blocks(rid) for rid in self._open)

    def reserve(
        self, tid: TransferId, num_tokens: int, now: float, held: Sequence[int] = ()
    ) -> list[int]:
        """Blocks for stage ``tid`` (all or nothing). Stage 0 opens the migration; a later
        stage must be the next one of the open migration (``UnknownMigration`` otherwise).
        ``held``: cached blocks here that stage 0 shares instead of receiving
        (``KVCacheManager.reserve_import``); the ids returned follow them."""
        rid = tid.request_id
        current = self._open.get(rid)
        if tid.index == 0:
            if current is not None:
                if current.migration_id == tid.migration_id:
                    raise UnknownMigration(f"stage 0 of migration {tid} arrived twice")
                self.abort(rid, current.migration_id)  # an older attempt, now superseded
            ids = self.kv.reserve_import(rid, num_tokens, held)
            self._open[rid] = InboundMigration(rid, tid.migration_id, now, in_flight=True)
            return ids
        entry = self._check(tid)
        if held:
            raise UnknownMigration(f"stage {tid} cannot share cached blocks: only stage 0 can")
        if entry.in_flight:
            raise UnknownMigration(f"stage {tid} arrived while another stage is in flight")
        ids = self.kv.extend_import(rid, num_tokens)
        entry.in_flight, entry.touched = True, now
        return ids

    def stage_done(self, tid: TransferId, now: float, fault: Fault | None = None) -> None:
        """A copy stage's bytes are written; the reservation waits for the next stage."""
        entry = self._check(tid)
        entry.in_flight, entry.touched = False, now
        entry.next_index = tid.index + 1
        if tid.index == 0:
            entry.fault = fault

    def check(self, tid: TransferId) -> InboundMigration:
        """The open migration that stage ``tid`` belongs to, if ``tid`` is the stage it
        expects now (``UnknownMigration`` otherwise)."""
        return self._check(tid)

    def finish(self, tid: TransferId) -> None:
        """The final commit succeeded: the reservation became the request's table."""
        self._check(tid)
        del self._open[tid.request_id]
        self.committed += 1

    def abort(self, request_id: str, migration_id: int | None = None) -> bool:
        """Free the migration's whole reservation (``migration_id`` None: whichever is
        open). False, changing nothing, if that migration is not open here."""
        entry = self._open.get(request_id)
        if entry is None or (migration_id is not None and entry.migration_id != migration_id):
            return False
        del self._open[request_id]
        self.kv.abort_import(request_id)
        self.aborted += 1
        if self._on_free is not None:
            self._on_free(request_id)
        return True

    def expire(self, now: float) -> list[str]:
        """Free every migration whose source went silent: no stage in flight and nothing
        heard for ``lease_s``. Returns their request ids."""
        stale = [
            e for e in self._open.values() if not e.in_flight and now - e.touched > self.lease_s
        ]
        for e in stale:
            self.abort(e.request_id, e.migration_id)
            self.expired += 1
        return [e.request_id for e in stale]

    def _check(self, tid: TransferId) -> InboundMigration:
        entry = self._open.get(tid.request_id)
        if entry is None or entry.migration_id != tid.migration_id:
            raise UnknownMigration(
                f"migration {tid.migration_id} of {tid.request_id!r} is not open here "
                "(it expired, was aborted or superseded)"
            )
        if tid.index != entry.next_index:
            raise UnknownMigration(
                f"stage {tid.index} of {tid.request_id!r} arrived, expected {entry.next_index}"
            )
        return entry
