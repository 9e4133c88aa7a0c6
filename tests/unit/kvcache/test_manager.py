"""KVCacheManager: unit tests of tables, export/import and audit, and a two-tier stateful
check of the handoff / offload / migration flow."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tandem.kvcache import KVCacheManager, KVExport, KVStateError, NoFreeBlocksError


def _mgr(num_blocks: int = 8, block_size: int = 4, tier: str = "device") -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, tier)


def _assert_clean(m: KVCacheManager) -> None:
    audit = m.audit()
    assert audit.ok, audit
    m.pool.check()


# ---- construction ------------------------------------------------------------------------


def test_new_manager() -> None:
    m = _mgr(8, 4, "host")
    assert m.block_size == 4 and m.tier == "host" and m.num_blocks == 8
    assert m.num_free_blocks == 8 and m.pool.num_blocks == 8
    assert m.pending_imports() == [] and m.open_exports() == []
    assert "host" in repr(m)
    _assert_clean(m)


@pytest.mark.parametrize("bs", [0, -4, 2.0, True])
def test_bad_block_size(bs: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(8, bs)  # type: ignore[arg-type]


def test_bad_tier_and_num_blocks() -> None:
    with pytest.raises(ValueError, match="tier"):
        KVCacheManager(8, 4, "")
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(-1, 4)


# ---- tables ------------------------------------------------------------------------------


def test_blocks_needed_and_can_allocate() -> None:
    m = _mgr(8, 4)
    assert m.blocks_needed("r", 0) == 0
    assert m.blocks_needed("r", 1) == 1
    assert m.blocks_needed("r", 4) == 1
    assert m.blocks_needed("r", 5) == 2
    m.allocate("r", 5)
    assert m.blocks_needed("r", 8) == 0
    assert m.blocks_needed("r", 9) == 1
    assert m.blocks_needed("r", 3) == 0  # never negative
    assert m.can_allocate("s", 24)  # 6 blocks, 6 free
    assert not m.can_allocate("s", 25)
    assert m.can_allocate("s", 20, reserve=1)
    assert not m.can_allocate("s", 21, reserve=1)
    with pytest.raises(ValueError, match="num_tokens"):
        m.blocks_needed("r", -1)
    with pytest.raises(ValueError, match="reserve"):
        m.can_allocate("r", 1, reserve=-1)


def test_allocate_grows_and_never_shrinks() -> None:
    m = _mgr(8, 4)
    first = m.allocate("r", 6)
    assert len(first) == 2 and m.block_table("r") == first
    assert m.num_tokens_capacity("r") == 8
    assert m.allocate("r", 8) == []
    assert m.allocate("r", 1) == []
    more = m.allocate("r", 9)
    assert len(more) == 1 and m.block_table("r") == first + more
    assert m.num_free_blocks == 5
    _assert_clean(m)


def test_allocate_zero_tokens_creates_empty_table() -> None:
    m = _mgr()
    assert m.allocate("r", 0) == []
    assert m.has("r") and m.block_table("r") == [] and m.num_tokens_capacity("r") == 0


def test_allocate_is_all_or_nothing() -> None:
    m = _mgr(4, 4, "device")
    m.allocate("a", 8)
    m.allocate("b", 4)
    with pytest.raises(
        NoFreeBlocksError,
        match=r"request 'b' needs 2 more blocks for 12 tokens; 1 of 4 free on device",
    ):
        m.allocate("b", 12)
    assert len(m.block_table("b")) == 1 and m.num_free_blocks == 1
    with pytest.raises(NoFreeBlocksError, match="'new'"):
        m.allocate("new", 8)
    assert not m.has("new")
    _assert_clean(m)


def test_block_table_is_a_copy() -> None:
    m = _mgr()
    m.allocate("r", 4)
    m.block_table("r").append(99)
    assert len(m.block_table("r")) == 1
    assert m.block_table("unknown") == []
    assert not m.has("unknown") and m.num_tokens_capacity("unknown") == 0


def test_free_is_idempotent() -> None:
    m = _mgr()
    m.allocate("r", 10)
    m.free("r")
    assert not m.has("r") and m.num_free_blocks == 8
    m.free("r")
    m.free("never-seen")
    _assert_clean(m)


def test_free_leaves_exports_and_imports_alone() -> None:
    m = _mgr()
    m.allocate("r", 8)
    exp = m.export("r", 8)
    m.reserve_import("r", 4)
    m.free("r")
    assert m.open_exports() == [exp] and m.pending_imports() == ["r"]
    assert m.num_free_blocks == 5
    _assert_clean(m)


def test_fork_shares_blocks() -> None:
    m = _mgr()
    parent = m.allocate("p", 8)
    m.fork("p", "c")
    assert m.block_table("c") == parent
    assert all(m.pool.refcount(b) == 2 for b in parent)
    assert m.num_free_blocks == 6
    audit = m.audit()
    assert audit.ok and audit.in_tables == 2 and audit.num_used == 2
    m.free("p")
    assert m.block_table("c") == parent and m.num_free_blocks == 6
    m.free("c")
    assert m.num_free_blocks == 8
    _assert_clean(m)


def test_fork_errors() -> None:
    m = _mgr()
    with pytest.raises(KVStateError, match=r"cannot fork 'p' on device: it has no table"):
        m.fork("p", "c")
    m.allocate("p", 4)
    m.allocate("c", 4)
    with pytest.raises(KVStateError, match=r"request 'c' already has a table"):
        m.fork("p", "c")
    m.reserve_import("d", 4)
    with pytest.raises(KVStateError, match=r"request 'd' already has a pending import"):
        m.fork("p", "d")
    _assert_clean(m)


# ---- export ------------------------------------------------------------------------------


def test_export_detaches_and_trims() -> None:
    m = _mgr(8, 4)
    table = m.allocate("r", 16)  # 4 blocks
    exp = m.export("r", 6)  # 2 blocks hold 6 tokens; 2 trailing blocks are freed
    assert exp == KVExport("r", tuple(table[:2]), 6)
    assert not m.has("r") and m.block_table("r") == []
    assert m.num_free_blocks == 6
    assert m.open_exports() == [exp]
    audit = m.audit()
    assert audit.ok and audit.in_exports == 2 and audit.in_tables == 0
    m.release_export(exp)
    assert m.open_exports() == [] and m.num_free_blocks == 8
    _assert_clean(m)


def test_export_zero_tokens() -> None:
    m = _mgr()
    m.allocate("r", 8)
    exp = m.export("r", 0)
    assert exp.block_ids == () and m.num_free_blocks == 8
    m.restore_export(exp)
    assert m.has("r") and m.block_table("r") == []


def test_export_errors() -> None:
    m = _mgr(8, 4)
    with pytest.raises(KVStateError, match=r"cannot export 'r' from device: it has no table"):
        m.export("r", 1)
    m.allocate("r", 8)
    with pytest.raises(KVStateError, match=r"cannot export 9 tokens of 'r'.*holds only 8"):
        m.export("r", 9)
    with pytest.raises(ValueError, match="num_tokens"):
        m.export("r", -1)
    assert m.has("r")
    m.export("r", 8)
    m.allocate("r", 4)  # a new table while the export is open is allowed
    with pytest.raises(KVStateError, match=r"'r'.*previous export is still open"):
        m.export("r", 4)
    assert m.has("r")
    _assert_clean(m)


def test_release_export_errors() -> None:
    m = _mgr()
    m.allocate("r", 4)
    exp = m.export("r", 4)
    m.release_export(exp)
    with pytest.raises(KVStateError, match=r"cannot release export of 'r'.*not open"):
        m.release_export(exp)
    with pytest.raises(KVStateError, match=r"cannot release export of 'x'"):
        m.release_export(KVExport("x", (0,), 1))
    m.allocate("r", 8)
    exp2 = m.export("r", 8)
    with pytest.raises(KVStateError, match="not open"):
        m.release_export(KVExport("r", exp2.block_ids, 7))  # does not match the open one
    m.release_export(KVExport("r", exp2.block_ids, 8))  # an equal copy does
    _assert_clean(m)


def test_restore_export() -> None:
    m = _mgr()
    table = m.allocate("r", 12)
    exp = m.export("r", 12)
    m.restore_export(exp)
    assert m.block_table("r") == table and m.open_exports() == []
    with pytest.raises(KVStateError, match=r"cannot restore export of 'r'.*not open"):
        m.restore_export(exp)
    _assert_clean(m)


def test_restore_export_refuses_when_id_is_taken() -> None:
    m = _mgr()
    m.allocate("r", 4)
    exp = m.export("r", 4)
    m.allocate("r", 4)
    with pytest.raises(
        KVStateError, match=r"cannot restore its export: request 'r' already has a table"
    ):
        m.restore_export(exp)
    assert m.open_exports() == [exp]
    m.free("r")
    m.reserve_import("r", 4)
    with pytest.raises(KVStateError, match=r"request 'r' already has a pending import"):
        m.restore_export(exp)
    m.abort_import("r")
    m.restore_export(exp)
    assert m.block_table("r") == list(exp.block_ids)
    _assert_clean(m)


def test_export_of_forked_table_keeps_child() -> None:
    m = _mgr()
    m.allocate("p", 16)
    m.fork("p", "c")
    exp = m.export("p", 5)  # keeps 2 blocks, drops the parent's reference to the other 2
    assert all(m.pool.refcount(b) == 2 for b in exp.block_ids)
    assert all(m.pool.refcount(b) == 1 for b in m.block_table("c")[2:])
    _assert_clean(m)
    m.release_export(exp)
    m.free("c")
    assert m.num_free_blocks == 8


# ---- import ------------------------------------------------------------------------------


def test_reserve_and_commit_import() -> None:
    m = _mgr(8, 4)
    ids = m.reserve_import("r", 9)
    assert len(ids) == 3 and m.pending_imports() == ["r"]
    assert not m.has("r") and m.num_free_blocks == 5
    audit = m.audit()
    assert audit.ok and audit.in_imports == 3
    assert m.commit_import("r") == ids
    assert m.block_table("r") == ids and m.pending_imports() == []
    assert m.num_tokens_capacity("r") == 12
    _assert_clean(m)


def test_reserve_import_errors() -> None:
    m = _mgr(4, 4, "host")
    m.allocate("r", 4)
    with pytest.raises(
        KVStateError, match=r"cannot reserve an import: request 'r' already has a table on host"
    ):
        m.reserve_import("r", 4)
    m.reserve_import("s", 4)
    with pytest.raises(KVStateError, match=r"request 's' already has a pending import on host"):
        m.reserve_import("s", 4)
    with pytest.raises(
        NoFreeBlocksError,
        match=r"cannot reserve 3 blocks to import 12 tokens of 't': 2 of 4 free on host",
    ):
        m.reserve_import("t", 12)
    assert m.pending_imports() == ["s"] and m.num_free_blocks == 2
    with pytest.raises(ValueError, match="num_tokens"):
        m.reserve_import("t", -1)
    _assert_clean(m)


def test_allocate_refuses_pending_import() -> None:
    m = _mgr()
    m.reserve_import("r", 4)
    with pytest.raises(KVStateError, match=r"request 'r' has a pending import on device"):
        m.allocate("r", 4)
    assert not m.has("r")


def test_commit_unknown_import() -> None:
    with pytest.raises(
        KVStateError, match=r"cannot commit import of 'r' on device: none is pending"
    ):
        _mgr().commit_import("r")


def test_abort_import() -> None:
    m = _mgr()
    m.reserve_import("r", 8)
    m.abort_import("r")
    assert m.pending_imports() == [] and m.num_free_blocks == 8
    m.abort_import("r")  # no-op
    m.abort_import("never-seen")
    _assert_clean(m)


def test_handoff_between_tiers() -> None:
    """Export from the device, import into the host, and back: the offload round trip."""
    dev, host = _mgr(8, 4, "device"), _mgr(16, 4, "host")
    dev.allocate("r", 10)
    exp = dev.export("r", 10)
    dst = host.reserve_import("r", exp.num_tokens)
    assert len(dst) == len(exp.block_ids) == 3
    host.commit_import("r")
    dev.release_export(exp)
    assert not dev.has("r") and host.block_table("r") == dst
    assert dev.num_free_blocks == 8
    back = host.export("r", 10)
    dev.reserve_import("r", back.num_tokens)
    dev.abort_import("r")  # the swap-in failed: the host keeps the request
    host.restore_export(back)
    assert host.block_table("r") == dst and dev.num_free_blocks == 8
    _assert_clean(dev)
    _assert_clean(host)


# ---- audit -------------------------------------------------------------------------------


def test_audit_finds_leaks() -> None:
    m = _mgr()
    m.allocate("r", 4)
    (stray,) = m.pool.allocate(1)  # used, but no table/export/import owns it
    audit = m.audit()
    assert not audit.ok and audit.leaked == (stray,) and audit.refcount_mismatch == (stray,)


def test_audit_finds_refcount_mismatch() -> None:
    m = _mgr()
    (b,) = m.allocate("r", 4)
    m.pool.incref([b])
    audit = m.audit()
    assert not audit.ok and audit.leaked == () and audit.refcount_mismatch == (b,)


def test_audit_finds_owned_free_block() -> None:
    m = _mgr()
    (b,) = m.allocate("r", 4)
    m.pool.free([b])  # freed behind the table's back
    audit = m.audit()
    assert not audit.ok and audit.refcount_mismatch == (b,)


def test_audit_counts_each_kind_once() -> None:
    m = _mgr(16, 4)
    m.allocate("a", 8)
    m.fork("a", "b")
    m.allocate("c", 12)
    m.export("c", 12)
    m.reserve_import("d", 4)
    audit = m.audit()
    assert audit.ok
    assert (audit.in_tables, audit.in_exports, audit.in_imports) == (2, 3, 1)
    assert audit.num_used == 6 and audit.num_free == 10 and audit.num_blocks == 16


def test_large_manager() -> None:
    m = _mgr(100_000, 16)
    for i in range(5_000):
        m.allocate(f"r{i}", 300)
    for i in range(0, 5_000, 2):
        m.free(f"r{i}")
    _assert_clean(m)


# ---- stateful: two tiers -----------------------------------------------------------------

RIDS = ["r0", "r1", "r2", "r3", "r4"]
TIERS = (0, 1)


class TwoTierMachine(RuleBasedStateMachine):
    """Two managers (two tiers or two engines) against an exact model of their owners.

    The model holds each table's block ids, each open export and each pending import's ids,
    as the API returned them. A handoff is an export on ``src`` paired with an import of
    the same request on ``dst``; plain release/restore/abort rules leave handoffs alone.
    Request ids are shared by both tiers, so a request may exist on both at once: each
    manager must get its own rules right regardless.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mgrs: list[KVCacheManager] = []
        self.tables: list[dict[str, list[int]]] = [{}, {}]
        self.exports: list[dict[str, KVExport]] = [{}, {}]
        self.imports: list[dict[str, list[int]]] = [{}, {}]
        self.handoffs: dict[tuple[int, str], int] = {}  # (src, rid) -> dst
        self.closed: list[KVExport] = []  # released or restored exports, for misuse rules

    @initialize(
        sizes=st.tuples(st.integers(1, 12), st.integers(1, 12)),
        block_size=st.sampled_from([1, 2, 4]),
    )
    def make(self, sizes: tuple[int, int], block_size: int) -> None:
        self.mgrs = [
            KVCacheManager(sizes[0], block_size, "device"),
            KVCacheManager(sizes[1], block_size, "host"),
        ]

    # -- helpers --

    def _in_handoff_as_dst(self, i: int, rid: str) -> bool:
        return any(dst == i and r == rid for (_, r), dst in self.handoffs.items())

    def _max_tokens(self, i: int) -> int:
        return (self.mgrs[i].num_blocks + 1) * self.mgrs[i].block_size

    # -- tables --

    @rule(i=st.sampled_from(TIERS), rid=st.sampled_from(RIDS), data=st.data())
    def allocate(self, i: int, rid: str, data: st.DataObject) -> None:
        m = self.mgrs[i]
        tokens = data.draw(st.integers(0, self._max_tokens(i)))
        if rid in self.imports[i]:
            with pytest.raises(KVStateError, match=rid):
                m.allocate(rid, tokens)
            return
        have = len(self.tables[i].get(rid, []))
        need = max(0, -(-tokens // m.block_size) - have)
        assert m.blocks_needed(rid, tokens) == need
        assert m.can_allocate(rid, tokens) == (need <= m.num_free_blocks)
        if need > m.num_free_blocks:
            with pytest.raises(NoFreeBlocksError, match=rid):
                m.allocate(rid, tokens)
            return
        new = m.allocate(rid, tokens)
        assert len(new) == need
        self.tables[i].setdefault(rid, []).extend(new)

    @rule(i=st.sampled_from(TIERS), rid=st.sampled_from(RIDS))
    def free(self, i: int, rid: str) -> None:
        self.mgrs[i].free(rid)
        self.tables[i].pop(rid, None)

    @rule(i=st.sampled_from(TIERS), parent=st.sampled_from(RIDS), child=st.sampled_from(RIDS))
    def fork(self, i: int, parent: str, child: str) -> None:
        m = self.mgrs[i]
        if parent not in self.tables[i] or child in self.tables[i] or child in self.imports[i]:
            with pytest.raises(KVStateError):
                m.fork(parent, child)
            return
        m.fork(parent, child)
        self.tables[i][child] = list(self.tables[i][parent])

    # -- plain exports (the far side is not modelled) --

    @rule(i=st.sampled_from(TIERS), rid=st.sampled_from(RIDS), data=st.data())
    def export(self, i: int, rid: str, data: st.DataObject) -> None:
        m = self.mgrs[i]
        if rid not in self.tables[i] or rid in self.exports[i]:
            with pytest.raises(KVStateError, match=rid):
                m.export(rid, 0)
            return
        self._export(i, rid, data)

    def _export(self, i: int, rid: str, data: st.DataObject) -> KVExport:
        m = self.mgrs[i]
        table = self.tables[i][rid]
        tokens = data.draw(st.integers(0, len(table) * m.block_size))
        exp = m.export(rid, tokens)
        keep = -(-tokens // m.block_size)
        assert exp == KVExport(rid, tuple(table[:keep]), tokens)
        del self.tables[i][rid]
        self.exports[i][rid] = exp
        return exp

    def _plain_exports(self, i: int) -> list[str]:
        return sorted(r for r in self.exports[i] if (i, r) not in self.handoffs)

    @precondition(lambda self: self._plain_exports(0) or self._plain_exports(1))
    @rule(data=st.data())
    def release_export(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from([i for i in TIERS if self._plain_exports(i)]))
        rid = data.draw(st.sampled_from(self._plain_exports(i)))
        exp = self.exports[i].pop(rid)
        self.mgrs[i].release_export(exp)
        self.closed.append(exp)

    @precondition(lambda self: self._plain_exports(0) or self._plain_exports(1))
    @rule(data=st.data())
    def restore_export(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from([i for i in TIERS if self._plain_exports(i)]))
        rid = data.draw(st.sampled_from(self._plain_exports(i)))
        self._restore(i, rid)

    def _restore(self, i: int, rid: str) -> bool:
        exp = self.exports[i][rid]
        if rid in self.tables[i] or rid in self.imports[i]:
            with pytest.raises(KVStateError, match=rid):
                self.mgrs[i].restore_export(exp)
            return False
        self.mgrs[i].restore_export(exp)
        del self.exports[i][rid]
        self.tables[i][rid] = list(exp.block_ids)
        self.closed.append(exp)
        return True

    @precondition(lambda self: self.closed)
    @rule(i=st.sampled_from(TIERS), data=st.data())
    def misuse_closed_export(self, i: int, data: st.DataObject) -> None:
        exp = data.draw(st.sampled_from(self.closed))
        if self.exports[i].get(exp.request_id) == exp:
            return  # an equal export is open again: using it is legitimate
        with pytest.raises(KVStateError, match=exp.request_id):
            self.mgrs[i].release_export(exp)
        with pytest.raises(KVStateError, match=exp.request_id):
            self.mgrs[i].restore_export(exp)

    # -- plain imports (the source is not modelled) --

    @rule(i=st.sampled_from(TIERS), rid=st.sampled_from(RIDS), data=st.data())
    def reserve_import(self, i: int, rid: str, data: st.DataObject) -> None:
        self._reserve(i, rid, data.draw(st.integers(0, self._max_tokens(i))))

    def _reserve(self, i: int, rid: str, tokens: int) -> bool:
        m = self.mgrs[i]
        if rid in self.tables[i] or rid in self.imports[i]:
            with pytest.raises(KVStateError, match=rid):
                m.reserve_import(rid, tokens)
            return False
        need = -(-tokens // m.block_size)
        if need > m.num_free_blocks:
            free_before = m.num_free_blocks
            with pytest.raises(NoFreeBlocksError, match=rid):
                m.reserve_import(rid, tokens)
            assert m.num_free_blocks == free_before
            return False
        ids = m.reserve_import(rid, tokens)
        assert len(ids) == need
        self.imports[i][rid] = ids
        return True

    @rule(i=st.sampled_from(TIERS), rid=st.sampled_from(RIDS))
    def commit_import(self, i: int, rid: str) -> None:
        if self._in_handoff_as_dst(i, rid):
            return
        m = self.mgrs[i]
        if rid not in self.imports[i]:
            with pytest.raises(KVStateError, match=rid):
                m.commit_import(rid)
            return
        ids = self.imports[i].pop(rid)
        assert m.commit_import(rid) == ids
        self.tables[i][rid] = ids

    @rule(i=st.sampled_from(TIERS), rid=st.sampled_from(RIDS))
    def abort_import(self, i: int, rid: str) -> None:
        if self._in_handoff_as_dst(i, rid):
            return
        self.mgrs[i].abort_import(rid)  # a no-op when nothing is pending
        self.imports[i].pop(rid, None)

    # -- handoff / offload / migration: export on src + import on dst --

    @rule(src=st.sampled_from(TIERS), rid=st.sampled_from(RIDS), data=st.data())
    def handoff_start(self, src: int, rid: str, data: st.DataObject) -> None:
        if rid not in self.tables[src] or rid in self.exports[src]:
            return
        dst = 1 - src
        exp = self._export(src, rid, data)
        if self._reserve(dst, rid, exp.num_tokens):
            assert len(self.imports[dst][rid]) == len(exp.block_ids)
            self.handoffs[(src, rid)] = dst
        else:  # the destination refused: the source keeps the request
            assert self._restore(src, rid)

    @precondition(lambda self: self.handoffs)
    @rule(data=st.data(), commit_first=st.booleans())
    def handoff_finish(self, data: st.DataObject, commit_first: bool) -> None:
        src, rid = data.draw(st.sampled_from(sorted(self.handoffs)))
        dst = self.handoffs.pop((src, rid))
        exp = self.exports[src].pop(rid)
        ids = self.imports[dst].pop(rid)
        if commit_first:
            assert self.mgrs[dst].commit_import(rid) == ids
            self.mgrs[src].release_export(exp)
        else:
            self.mgrs[src].release_export(exp)
            assert self.mgrs[dst].commit_import(rid) == ids
        self.tables[dst][rid] = ids
        self.closed.append(exp)

    @precondition(lambda self: self.handoffs)
    @rule(data=st.data())
    def handoff_abort(self, data: st.DataObject) -> None:
        src, rid = data.draw(st.sampled_from(sorted(self.handoffs)))
        dst = self.handoffs.pop((src, rid))
        self.mgrs[dst].abort_import(rid)
        del self.imports[dst][rid]
        if not self._restore(src, rid):
            # The id got a new table on the source meanwhile: drop the old blocks.
            exp = self.exports[src].pop(rid)
            self.mgrs[src].release_export(exp)
            self.closed.append(exp)

    # -- invariants --

    @invariant()
    def matches_model(self) -> None:
        for i, m in enumerate(self.mgrs):
            audit = m.audit()
            assert audit.ok, audit
            m.pool.check()
            pool = m.pool
            assert pool.num_free + pool.num_used == pool.num_blocks
            assert m.num_free_blocks == pool.num_free

            for rid in RIDS:
                assert m.has(rid) == (rid in self.tables[i])
                assert m.block_table(rid) == self.tables[i].get(rid, [])
            assert set(m.pending_imports()) == set(self.imports[i])
            assert sorted(m.open_exports(), key=lambda e: e.request_id) == sorted(
                self.exports[i].values(), key=lambda e: e.request_id
            )

            # Owners counted independently of the manager's own audit.
            table_ids = {b for t in self.tables[i].values() for b in t}
            export_ids = {b for e in self.exports[i].values() for b in e.block_ids}
            import_refs = [b for ids in self.imports[i].values() for b in ids]
            owners: Counter[int] = Counter(import_refs)
            for t in self.tables[i].values():
                owners.update(t)
            for e in self.exports[i].values():
                owners.update(e.block_ids)
            # A pending import's block is never shared with anything.
            assert all(owners[b] == 1 for b in import_refs)
            # Every block's refcount is its number of owners; used <=> owned.
            for b in range(pool.num_blocks):
                assert pool.refcount(b) == owners[b], (i, b)
            assert pool.num_used == len(owners)
            assert (audit.in_tables, audit.in_exports, audit.in_imports) == (
                len(table_ids),
                len(export_ids),
                len(set(import_refs)),
            )

    def teardown(self) -> None:
        for i, m in enumerate(self.mgrs):
            for rid in list(self.imports[i]):
                m.abort_import(rid)
            for exp in list(self.exports[i].values()):
                m.release_export(exp)
            for rid in list(self.tables[i]):
                m.free(rid)
            assert m.num_free_blocks == m.num_blocks
            assert m.pending_imports() == [] and m.open_exports() == []
            m.pool.check()
            assert m.audit().ok


TwoTierMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_two_tiers_stateful = TwoTierMachine.TestCase


def test_extend_import_grows_one_pending_import_stage_by_stage() -> None:
    m = _mgr(8, 4)
    first = m.reserve_import("r", 8)
    second = m.extend_import("r", 4)
    assert len(first) == 2 and len(second) == 1 and m.pending_import_blocks("r") == 3
    assert m.audit().ok and m.audit().in_imports == 3
    with pytest.raises(NoFreeBlocksError):
        m.extend_import("r", 24)  # 6 blocks, 5 free: nothing reserved
    assert m.num_free_blocks == 5
    assert m.commit_import("r") == first + second
    _assert_clean(m)


def test_extend_import_needs_a_pending_import_and_abort_frees_every_stage() -> None:
    m = _mgr(8, 4)
    with pytest.raises(KVStateError, match="none is pending"):
        m.extend_import("r", 4)
    m.reserve_import("r", 4)
    m.extend_import("r", 8)
    m.abort_import("r")
    assert m.num_free_blocks == 8 and m.pending_import_blocks("r") == 0
    assert m.audit().ok


def test_table_stamp_changes_exactly_when_the_table_does():
    from tandem.kvcache.manager import KVCacheManager

    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.table_stamp("a") is None
    kv.allocate("a", 3)
    first = kv.table_stamp("a")
    kv.allocate("a", 4)  # still one block: same table, same stamp
    assert kv.table_stamp("a") == first
    kv.allocate("a", 5)
    grown = kv.table_stamp("a")
    assert grown != first
    exp = kv.export("a", 5)
    assert kv.table_stamp("a") is None
    kv.restore_export(exp)
    assert kv.table_stamp("a") not in (None, first, grown)
    kv.free("a")
    kv.allocate("a", 5)  # same length again, maybe other blocks: a new stamp
    assert kv.table_stamp("a") not in (first, grown)


@pytest.mark.parametrize("bad", [True, 2.0, -1])
def test_a_bad_token_count_is_refused_even_when_the_table_covers_it(bad):
    from tandem.kvcache.manager import KVCacheManager

    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate("a", 3)
    with pytest.raises(ValueError, match="num_tokens"):
        kv.allocate("a", bad)
    with pytest.raises(ValueError, match="num_tokens"):
        kv.can_allocate("a", bad)
