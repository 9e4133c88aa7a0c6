"""Prefix caching in the KV bookkeeping: block names, named blocks in the pool (refcounts,
LRU eviction), the manager's match/adopt/cache API, and a stateful check of a device and
a host tier with a model of every block's bytes under allocate / share / compute / evict /
swap / export / import."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tandem.kvcache import BlockHasher, BlockPool, KVCacheManager, KVStateError
from tandem.kvcache.prefix import PrefixCacheStats, hash_block, root_hash, summary_depth

# ---- names -------------------------------------------------------------------------------


def test_names_are_a_chain_over_full_blocks_only() -> None:
    h = BlockHasher(4, salt="m")
    names = h.hashes(list(range(10)))
    assert len(names) == 2  # 10 tokens: two full blocks, the partial one has no name
    assert names[0] == hash_block(root_hash("m"), [0, 1, 2, 3])
    assert names[1] == hash_block(names[0], [4, 5, 6, 7])
    assert all(isinstance(n, bytes) and len(n) == 16 for n in names)


def test_a_name_covers_its_whole_prefix() -> None:
    h = BlockHasher(4)
    a = h.hashes([1, 2, 3, 4, 5, 6, 7, 8])
    b = h.hashes([9, 2, 3, 4, 5, 6, 7, 8])  # same second block, different first block
    assert a[1] != b[1]
    c = h.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9])
    assert c[:2] == a


def test_salt_and_block_size_change_every_name() -> None:
    tokens = list(range(32))
    assert BlockHasher(4, "a").hashes(tokens)[0] != BlockHasher(4, "b").hashes(tokens)[0]
    assert BlockHasher(4).hashes(tokens)[1] != BlockHasher(8).hashes(tokens)[0]


def test_extend_is_incremental_and_bounded_by_num_tokens() -> None:
    h = BlockHasher(4)
    tokens = list(range(20))
    names: list[bytes] = []
    h.extend(names, tokens, 7)
    assert len(names) == 1
    h.extend(names, tokens, 16)
    assert names == h.hashes(tokens[:16])
    h.extend(names, tokens, 100)  # bounded by the tokens there are
    assert names == h.hashes(tokens)


def test_names_are_stable_across_processes() -> None:
    # The router and every worker must compute the same names: no per-process hash seed.
    code = "from tandem.kvcache import BlockHasher; print(BlockHasher(2, 'x').hashes([1, 2, 3, 4])[1].hex())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == BlockHasher(2, "x").hashes([1, 2, 3, 4])[1].hex()
    assert root_hash("").hex() == "c28bf1cc6ab8a8e6659eda9b5065d476"  # the format is pinned


def test_summary_depths_are_powers_of_two_minus_one() -> None:
    assert [i for i in range(40) if summary_depth(i)] == [0, 1, 3, 7, 15, 31]


def test_stats_rates() -> None:
    s = PrefixCacheStats()
    assert s.token_hit_rate == 0.0 and s.request_hit_rate == 0.0
    s.record(100, 64)
    s.record(50, 0)
    assert s.queries == 2 and s.hits == 1
    assert s.token_hit_rate == pytest.approx(64 / 150) and s.request_hit_rate == 0.5


def test_hashing_is_linear_in_blocks() -> None:
    h = BlockHasher(16)
    tokens = [random.randrange(100_000) for _ in range(16 * 20_000)]
    t0 = time.perf_counter()
    names = h.hashes(tokens)
    assert len(names) == 20_000
    # Generous bound (a shared CI core): ~1 µs per block in practice.
    assert time.perf_counter() - t0 < 5.0


# ---- pool: named blocks ------------------------------------------------------------------


def test_named_block_outlives_its_last_reference() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    assert pool.cache(b, b"n")
    pool.free([b])
    assert pool.refcount(b) == 0 and pool.lookup(b"n") == b
    assert pool.num_free == 4 and pool.num_evictable == 1 and pool.num_empty == 3
    assert pool.acquire([b]) == 1  # revived from the evictable set
    assert pool.refcount(b) == 1 and pool.num_free == 3
    assert pool.acquire([b]) == 0  # a second holder
    assert pool.refcount(b) == 2
    pool.free([b, b])
    pool.check()


def test_empty_blocks_go_before_any_eviction_and_eviction_is_lru() -> None:
    evicted: list[tuple[int, bytes]] = []
    pool = BlockPool(4, on_evict=lambda b, n: evicted.append((b, n)))
    ids = pool.allocate(3)
    for i, b in enumerate(ids):
        pool.cache(b, bytes([i]))
    pool.free([ids[1], ids[0], ids[2]])  # release order: 1, 0, 2
    assert pool.allocate(1) == [3] and not evicted  # the empty block first
    got = pool.allocate(2)
    assert got == [ids[1], ids[0]] and evicted == [(ids[1], b"\x01"), (ids[0], b"\x00")]
    assert pool.lookup(b"\x01") is None and pool.lookup(b"\x02") == ids[2]
    assert pool.num_evictions == 2 and pool.name_of(got[0]) is None
    pool.check()


def test_cache_refuses_duplicates_and_unused_blocks() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache(a, b"n") and pool.cache(a, b"n")  # idempotent
    assert not pool.cache(b, b"n")  # the name is a's; b stays private
    assert pool.name_of(b) is None
    with pytest.raises(KVStateError, match="another name"):
        pool.cache(a, b"m")
    with pytest.raises(KVStateError, match="not in use"):
        pool.cache(3, b"x")
    with pytest.raises(KVStateError, match="not cached"):
        pool.acquire([a, b])
    assert pool.refcount(a) == 1  # all or nothing
    pool.free([b])
    with pytest.raises(KVStateError, match="it is free"):
        pool.incref([b])  # incref never revives: only acquire, and only named blocks
    pool.check()


def test_evict_all_and_check_catches_a_named_empty_block() -> None:
    pool = BlockPool(3)
    ids = pool.allocate(2)
    pool.cache(ids[0], b"a")
    pool.cache(ids[1], b"b")
    pool.free(ids[:1])
    assert pool.evict_all() == 1
    assert pool.lookup(b"a") is None and pool.lookup(b"b") == ids[1]
    pool.check()
    pool.free(ids[1:])
    pool._evictable.pop(ids[1])
    pool._free.append(ids[1])
    with pytest.raises(KVStateError, match="keeps a name"):
        pool.check()


def test_large_pool_hits_are_o_blocks_touched() -> None:
    n = 100_000
    m = KVCacheManager(n, 16)
    h = BlockHasher(16)
    system = [random.randrange(50_000) for _ in range(16 * 64)]
    t0 = time.perf_counter()
    for i in range(2_000):
        tokens = system + [random.randrange(50_000) for _ in range(16 * 8 + 3)]
        names = h.hashes(tokens)
        rid = f"r{i}"
        hit = m.match_prefix(names, (len(tokens) - 1) // 16)
        m.adopt_prefix(rid, hit)
        m.allocate(rid, len(tokens))
        m.cache_blocks(rid, names, len(tokens))
        if i:
            assert len(hit) == 64
        m.free(rid)
    assert time.perf_counter() - t0 < 30.0
    assert m.num_cached_blocks == 64 + 2_000 * 8 and m.num_free_blocks == n
    assert m.audit().ok


# ---- manager -----------------------------------------------------------------------------


def _names(tokens: list[int], bs: int = 2) -> list[bytes]:
    return BlockHasher(bs).hashes(tokens)


def test_match_adopt_and_cache() -> None:
    m = KVCacheManager(8, 4)
    tokens = list(range(10))
    names = _names(tokens, 4)
    assert m.match_prefix(names) == []
    m.allocate("a", 10)
    assert m.cache_blocks("a", names, 10) == 2
    assert m.cache_blocks("a", names, 10) == 0  # already offered
    table = m.block_table("a")
    assert m.match_prefix(names) == table[:2]
    assert m.match_prefix(names, max_blocks=1) == table[:1]
    m.adopt_prefix("b", table[:2])
    assert m.block_table("b") == table[:2]
    assert m.pool.refcount(table[0]) == 2
    assert m.num_releasable("a") == 1 and m.num_releasable("b") == 0
    audit = m.audit()
    assert audit.ok and audit.num_cached == 2 and audit.shared_unnamed == ()
    m.free("a")
    m.free("b")
    assert m.num_free_blocks == 8 and m.num_cached_blocks == 2
    assert m.pool.num_evictable == 2
    # The chain's tail is released first, so it is evicted first.
    assert list(m.pool.evictable_block_ids()) == [table[1], table[0]]
    assert m.audit().ok


def test_adopt_prefix_revives_and_counts() -> None:
    m = KVCacheManager(4, 2)
    names = _names([1, 2, 3, 4])
    m.allocate("a", 4)
    m.cache_blocks("a", names, 4)
    hit = m.block_table("a")
    m.free("a")
    assert m.num_reviving(hit) == 2
    m.adopt_prefix("b", hit)
    assert m.num_free_blocks == 2 and m.num_reviving(hit) == 0
    with pytest.raises(KVStateError, match="already has a table"):
        m.adopt_prefix("b", hit)
    m.reserve_import("c", 2)
    with pytest.raises(KVStateError, match="pending import"):
        m.adopt_prefix("c", hit)
    assert m.audit().ok


def test_cache_blocks_needs_names_and_a_table() -> None:
    m = KVCacheManager(4, 2)
    with pytest.raises(KVStateError, match="no table"):
        m.cache_blocks("a", [], 2)
    m.allocate("a", 4)
    with pytest.raises(KVStateError, match="2 full blocks"):
        m.cache_blocks("a", _names([1, 2]), 4)
    assert m.cache_blocks("a", _names([1, 2, 3, 4]), 3) == 1  # only computed full blocks


def test_a_duplicate_computation_stays_private() -> None:
    m = KVCacheManager(8, 2)
    names = _names([5, 6, 7, 8])
    m.allocate("a", 4)
    m.allocate("b", 4)
    assert m.cache_blocks("a", names, 4) == 2
    assert m.cache_blocks("b", names, 4) == 0
    assert all(not m.pool.is_cached(b) for b in m.block_table("b"))
    m.free("b")
    assert m.pool.num_empty == 6


def test_check_writable() -> None:
    m = KVCacheManager(8, 2)
    names = _names([1, 2, 3, 4, 5])
    m.allocate("a", 5)
    m.cache_blocks("a", names, 4)
    m.check_writable("a", 4, 5)  # the partial third block is a's own
    with pytest.raises(KVStateError, match="shared or cached"):
        m.check_writable("a", 3, 5)  # position 3 is in a cached block
    with pytest.raises(KVStateError, match="past its table"):
        m.check_writable("a", 4, 7)
    m.adopt_prefix("b", m.match_prefix(names))
    m.allocate("b", 5)
    m.check_writable("b", 4, 5)
    with pytest.raises(KVStateError, match="shared or cached"):
        m.check_writable("b", 0, 1)


def test_export_and_import_keep_names_and_sharing() -> None:
    m = KVCacheManager(8, 2)
    names = _names([1, 2, 3, 4])
    m.allocate("a", 4)
    m.cache_blocks("a", names, 4)
    m.adopt_prefix("b", m.block_table("a"))
    exp = m.export("a", 4)  # a's references move to the export; b still holds them
    assert all(m.pool.refcount(b) == 2 for b in exp.block_ids)
    m.release_export(exp)
    assert all(m.pool.refcount(b) == 1 for b in exp.block_ids)
    m.free("b")
    assert m.match_prefix(names) == list(exp.block_ids)  # still cached, now evictable
    ids = m.reserve_import("c", 4)  # 6 empty blocks: no eviction
    assert m.match_prefix(names) == list(exp.block_ids)
    m.commit_import("c")
    assert m.cache_blocks("c", names, 4) == 0  # duplicates of cached blocks stay private
    assert m.block_table("c") == ids and m.audit().ok


def test_reserve_import_evicts_only_when_needed() -> None:
    m = KVCacheManager(4, 2)
    names = _names([1, 2, 3, 4])
    m.allocate("a", 4)
    m.cache_blocks("a", names, 4)
    m.free("a")
    m.reserve_import("b", 4)  # the two empty blocks
    assert len(m.match_prefix(names)) == 2
    m.reserve_import("c", 2)  # evicts the chain's tail, not its head
    assert len(m.match_prefix(names)) == 1
    assert m.num_evictions == 1 and m.audit().ok


# ---- stateful: device + host tiers with a model of every block's bytes ----------------------

RIDS = ["a", "b", "c", "d"]
# A few shared prefixes; requests are a prefix cut at a random length plus a random tail,
# so they share block-aligned and unaligned prefixes of many lengths.
BASES = [[7] * 6 + list(range(20)), list(range(30, 60)), [1, 2] * 12]


class PrefixMachine(RuleBasedStateMachine):
    """A device and a host tier, requests that share prefixes, and ``bytes_``: what each
    block of each tier holds (a block name once a full block is computed or copied, else
    a private marker). Every rule that writes does so only where ``check_writable``
    allows, so the invariants prove: a named (cached) block always holds exactly the
    bytes of its name, whatever was evicted, shared, swapped or imported meanwhile; every
    block a request reads holds what that request computed or hit; nothing leaks."""

    def __init__(self) -> None:
        super().__init__()
        self.dev: KVCacheManager
        self.host: KVCacheManager
        self.bs = 1
        self.hasher = BlockHasher(1)
        self.bytes_: list[dict[int, object]] = [{}, {}]  # tier -> block -> contents
        self.reqs: dict[str, dict] = {}  # rid -> {tokens, names, computed, tier}
        self.exports: dict[str, object] = {}  # rid -> open device export (a handoff out)

    @initialize(
        sizes=st.tuples(st.integers(2, 16), st.integers(1, 16)),
        bs=st.sampled_from([1, 2, 4]),
    )
    def make(self, sizes: tuple[int, int], bs: int) -> None:
        self.bs = bs
        self.hasher = BlockHasher(bs, salt="test")
        self.dev = KVCacheManager(sizes[0], bs, "device")
        self.host = KVCacheManager(sizes[1], bs, "host")

    def _mgr(self, tier: int) -> KVCacheManager:
        return self.dev if tier == 0 else self.host

    def _on(self, tier: int) -> list[str]:
        """Requests with a table on ``tier`` (not detached by an open export)."""
        return sorted(
            r for r, v in self.reqs.items() if v["tier"] == tier and r not in self.exports
        )

    # -- rules --

    @rule(rid=st.sampled_from(RIDS), data=st.data())
    def admit(self, rid: str, data: st.DataObject) -> None:
        """A new request on the device: hit its longest cached prefix (leaving one token)."""
        if rid in self.reqs:
            return
        base = data.draw(st.sampled_from(BASES))
        cut = data.draw(st.integers(0, len(base)))
        tail = data.draw(st.lists(st.integers(100, 103), max_size=6))
        tokens = base[:cut] + tail or [5]
        names = self.hasher.hashes(tokens)
        hit = self.dev.match_prefix(names, (len(tokens) - 1) // self.bs)
        for i, b in enumerate(hit):
            assert self.bytes_[0][b] == names[i], "a cached block holds other bytes"
        self.dev.adopt_prefix(rid, hit)
        self.reqs[rid] = {
            "tokens": tokens,
            "names": names,
            "computed": len(hit) * self.bs,
            "tier": 0,
        }

    @precondition(lambda self: self._on(0))
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """A chunk: allocate, write only own blocks, then name the full computed ones."""
        rid = data.draw(st.sampled_from(self._on(0)))
        r = self.reqs[rid]
        start = r["computed"]
        end = min(len(r["tokens"]), start + data.draw(st.integers(1, 3 * self.bs)))
        if end <= start or not self.dev.can_allocate(rid, end):
            return
        self.dev.allocate(rid, end)
        self.dev.check_writable(rid, start, end)
        table = self.dev.block_table(rid)
        for i in range(start // self.bs, -(-end // self.bs)):
            full = (i + 1) * self.bs <= end
            self.bytes_[0][table[i]] = r["names"][i] if full else ("partial", rid, i, end)
        r["computed"] = end
        self.dev.cache_blocks(rid, r["names"], end)

    @rule(rid=st.sampled_from(RIDS))
    def finish(self, rid: str) -> None:
        if rid in self.exports:
            return  # its blocks belong to the export until the handoff ends
        r = self.reqs.pop(rid, None)
        if r is not None:
            self._mgr(r["tier"]).free(rid)

    @precondition(lambda self: self._on(0))
    @rule(data=st.data())
    def swap_out(self, data: st.DataObject) -> None:
        """Device -> host: export, copy bytes, commit on the host and name its blocks there."""
        rid = data.draw(st.sampled_from(self._on(0)))
        self._move(rid, 0, 1)

    @precondition(lambda self: self._on(1))
    @rule(data=st.data())
    def swap_in(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self._on(1)))
        self._move(rid, 1, 0)

    def _move(self, rid: str, src: int, dst: int) -> None:
        r = self.reqs[rid]
        s, d = self._mgr(src), self._mgr(dst)
        n = r["computed"]
        if -(-n // self.bs) > d.num_free_blocks:
            return
        exp = s.export(rid, n)
        ids = d.reserve_import(rid, n)
        for a, b in zip(exp.block_ids, ids, strict=True):
            self.bytes_[dst][b] = self.bytes_[src][a]
        d.commit_import(rid)
        s.release_export(exp)
        d.cache_blocks(rid, r["names"], n)
        r["tier"] = dst

    @precondition(lambda self: self._on(0))
    @rule(data=st.data())
    def handoff_out(self, data: st.DataObject) -> None:
        """An export to another engine (not modelled) that stays open for a while."""
        rid = data.draw(st.sampled_from(self._on(0)))
        self.exports[rid] = self.dev.export(rid, self.reqs[rid]["computed"])

    @precondition(lambda self: self.exports)
    @rule(data=st.data(), restore=st.booleans())
    def handoff_end(self, data: st.DataObject, restore: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.exports)))
        exp = self.exports.pop(rid)
        for i, b in enumerate(exp.block_ids):  # the export's bytes were never touched
            if (i + 1) * self.bs <= exp.num_tokens:
                assert self.bytes_[0][b] == self.reqs[rid]["names"][i]
        if restore:
            self.dev.restore_export(exp)
        else:
            self.dev.release_export(exp)
            del self.reqs[rid]

    @rule(rid=st.sampled_from(RIDS), data=st.data())
    def import_in(self, rid: str, data: st.DataObject) -> None:
        """A request arrives from another engine with its bytes (handoff, migration)."""
        if rid in self.reqs:
            return
        tokens = data.draw(st.sampled_from(BASES))[: data.draw(st.integers(1, 30))] or [1]
        names = self.hasher.hashes(tokens)
        n = len(tokens)
        if -(-n // self.bs) > self.dev.num_free_blocks:
            return
        ids = self.dev.reserve_import(rid, n)
        if data.draw(st.booleans()):
            self.dev.abort_import(rid)
            return
        for i, b in enumerate(ids):
            full = (i + 1) * self.bs <= n
            self.bytes_[0][b] = names[i] if full else ("partial", rid, i, n)
        self.dev.commit_import(rid)
        self.dev.cache_blocks(rid, names, n)
        self.reqs[rid] = {"tokens": tokens, "names": names, "computed": n, "tier": 0}

    # -- invariants --

    @invariant()
    def sound(self) -> None:
        for tier in (0, 1):
            m = self._mgr(tier)
            audit = m.audit()
            assert audit.ok, audit
            assert audit.shared_unnamed == (), "a shared block that is not a full cached block"
            m.pool.check()
            # A named block holds its name's bytes, used or evictable.
            for b, name in m.pool._name_of.items():
                assert self.bytes_[tier][b] == name, (tier, b)
        for rid, r in self.reqs.items():
            if rid in self.exports:
                continue
            m = self._mgr(r["tier"])
            table = m.block_table(rid)
            for i in range(r["computed"] // self.bs):
                assert self.bytes_[r["tier"]][table[i]] == r["names"][i], (rid, i)

    def teardown(self) -> None:
        if not hasattr(self, "dev"):
            return
        for exp in self.exports.values():
            self.dev.release_export(exp)
        for rid, r in self.reqs.items():
            if rid not in self.exports:
                self._mgr(r["tier"]).free(rid)
        for m in (self.dev, self.host):
            assert m.num_free_blocks == m.num_blocks and m.pool.num_used == 0
            assert m.audit().ok


PrefixMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_prefix_cache_stateful = PrefixMachine.TestCase
