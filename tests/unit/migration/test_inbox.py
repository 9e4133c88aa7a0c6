"""The destination's bookkeeping of migrations arriving in stages, and its expiry (pure)."""

from __future__ import annotations

import pytest

from tandem.kvcache import KVCacheManager
from tandem.migration import Fault, MigrationInbox, TransferId
from tandem.migration.inbox import UnknownMigration


def _inbox(blocks=16, lease_s=5.0):
    freed: list[str] = []
    kv = KVCacheManager(blocks, 4)
    return MigrationInbox(kv, lease_s, on_free=freed.append), kv, freed


def test_stages_grow_one_reservation_that_commits_as_the_table():
    inbox, kv, _ = _inbox()
    a = inbox.reserve(TransferId("r", 1, 0, False), 8, now=0.0)
    inbox.stage_done(TransferId("r", 1, 0, False), now=1.0, fault=Fault("dest", "commit"))
    b = inbox.reserve(TransferId("r", 1, 1, True), 3, now=2.0)
    assert inbox.reserved_blocks == 3 and kv.num_free_blocks == 13
    assert inbox.check(TransferId("r", 1, 1, True)).fault == Fault("dest", "commit")
    assert kv.commit_import("r") == a + b  # the caller's commit takes every stage's blocks
    inbox.finish(TransferId("r", 1, 1, True))
    assert "r" not in inbox and inbox.committed == 1 and inbox.reserved_blocks == 0
    assert kv.audit().ok


def test_abort_frees_every_stage_once_and_ignores_other_attempts():
    inbox, kv, freed = _inbox()
    inbox.reserve(TransferId("r", 1, 0, False), 8, now=0.0)
    inbox.stage_done(TransferId("r", 1, 0, False), now=0.0)
    inbox.reserve(TransferId("r", 1, 1, False), 8, now=0.0)  # in flight
    assert not inbox.abort("r", migration_id=2)  # a stale attempt's late abort
    assert inbox.abort("r") and kv.num_free_blocks == 16 and freed == ["r"]
    assert not inbox.abort("r", 1)  # the transfer's own abort, later: nothing left to free
    assert kv.num_free_blocks == 16 and kv.audit().ok
    with pytest.raises(UnknownMigration):  # its stage commit arrives after the abort
        inbox.stage_done(TransferId("r", 1, 1, False), now=1.0)


def test_out_of_order_unknown_and_superseded_stages_are_refused():
    inbox, kv, _ = _inbox()
    with pytest.raises(UnknownMigration):
        inbox.reserve(TransferId("r", 1, 1, False), 4, now=0.0)  # never opened (or expired)
    inbox.reserve(TransferId("r", 1, 0, False), 4, now=0.0)
    with pytest.raises(UnknownMigration):
        inbox.reserve(TransferId("r", 1, 1, False), 4, now=0.0)  # stage 0 still in flight
    inbox.stage_done(TransferId("r", 1, 0, False), now=0.0)
    with pytest.raises(UnknownMigration):
        inbox.reserve(TransferId("r", 1, 2, False), 4, now=0.0)  # skips stage 1
    inbox.reserve(TransferId("r", 2, 0, False), 8, now=0.0)  # a new attempt replaces it
    assert inbox.get("r").migration_id == 2 and kv.pending_import_blocks("r") == 2
    assert inbox.aborted == 1 and kv.audit().ok


def test_a_silent_source_loses_its_reservation_after_the_lease_but_a_stage_in_flight_does_not():
    inbox, kv, freed = _inbox(lease_s=5.0)
    inbox.reserve(TransferId("quiet", 1, 0, False), 8, now=0.0)
    inbox.stage_done(TransferId("quiet", 1, 0, False), now=1.0)
    inbox.reserve(TransferId("busy", 1, 0, False), 8, now=0.0)  # its transfer's lease rules
    assert inbox.expire(now=5.9) == []
    assert inbox.expire(now=6.1) == ["quiet"] and freed == ["quiet"]
    assert inbox.expired == 1 and "busy" in inbox and kv.pending_import_blocks("busy") == 2
    with pytest.raises(UnknownMigration):
        inbox.reserve(TransferId("quiet", 1, 1, True), 4, now=7.0)
    assert kv.audit().ok


def test_no_free_blocks_reserves_nothing():
    from tandem.kvcache import NoFreeBlocksError

    inbox, kv, _ = _inbox(blocks=4)
    with pytest.raises(NoFreeBlocksError):
        inbox.reserve(TransferId("r", 1, 0, False), 20, now=0.0)
    assert "r" not in inbox and kv.num_free_blocks == 4
