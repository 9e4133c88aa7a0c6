"""BlockPool: unit tests of every method and error, and a stateful model check."""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tandem.kvcache import BlockPool, KVStateError, NoFreeBlocksError

# ---- construction ------------------------------------------------------------------------


def test_new_pool_is_all_free() -> None:
    pool = BlockPool(8)
    assert pool.num_blocks == 8
    assert pool.num_free == 8
    assert pool.num_used == 0
    assert all(pool.refcount(b) == 0 for b in range(8))
    pool.check()


def test_empty_pool_is_valid() -> None:
    pool = BlockPool(0)
    assert pool.allocate(0) == []
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.check()


@pytest.mark.parametrize("bad", [-1, 2.0, "3", None, True])
def test_bad_num_blocks(bad: object) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(bad)  # type: ignore[arg-type]


# ---- allocate ----------------------------------------------------------------------------


def test_allocate_gives_distinct_used_blocks() -> None:
    pool = BlockPool(10)
    a = pool.allocate(4)
    b = pool.allocate(3)
    assert len(a) == 4 and len(b) == 3
    assert len(set(a) | set(b)) == 7
    assert all(pool.refcount(x) == 1 for x in a + b)
    assert pool.num_free == 3 and pool.num_used == 7
    assert pool.allocate(0) == []
    pool.check()


def test_allocate_too_many_allocates_nothing() -> None:
    pool = BlockPool(5)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError, match=r"cannot allocate 3 blocks: 2 of 5 free"):
        pool.allocate(3)
    assert pool.num_free == 2
    assert len(pool.allocate(2)) == 2
    pool.check()


@pytest.mark.parametrize("bad", [-1, 1.5, None])
def test_allocate_bad_count(bad: object) -> None:
    with pytest.raises(ValueError, match="allocate"):
        BlockPool(4).allocate(bad)  # type: ignore[arg-type]


def test_reuse_is_fifo() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.free([1])
    # 2 and 3 were free longer than 1, so they come first.
    assert pool.allocate(2) == [2, 3]
    assert pool.allocate(1) == [1]
    pool.free([3, 0])
    assert pool.allocate(2) == [3, 0]


# ---- incref / free -----------------------------------------------------------------------


def test_incref_shares_until_last_free() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.incref([b])
    assert pool.refcount(b) == 2
    pool.free([b])
    assert pool.refcount(b) == 1 and pool.num_used == 1
    pool.free([b])
    assert pool.refcount(b) == 0 and pool.num_free == 4
    pool.check()


def test_incref_and_free_count_repeated_ids() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.incref([b, b])
    assert pool.refcount(b) == 3
    pool.free([b, b, b])
    assert pool.refcount(b) == 0
    pool.check()


def test_incref_free_block_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    free_id = next(x for x in range(4) if x != b)
    with pytest.raises(KVStateError, match=rf"cannot share block {free_id}: it is free"):
        pool.incref([b, free_id])
    assert pool.refcount(b) == 1
    pool.check()


@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_incref_out_of_range(bad: int) -> None:
    pool = BlockPool(4)
    with pytest.raises(KVStateError, match=rf"block {bad} is outside 0..3"):
        pool.incref([bad])


def test_incref_non_int() -> None:
    with pytest.raises(KVStateError, match="must be an int"):
        BlockPool(4).incref(["0"])  # type: ignore[list-item]


def test_double_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(KVStateError, match=rf"double free of block {a}"):
        pool.free([b, a])
    assert pool.refcount(b) == 1
    pool.check()


def test_free_more_times_than_references() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    with pytest.raises(KVStateError, match=rf"cannot free block {b} 2 times: it has only 1"):
        pool.free([b, b])
    assert pool.refcount(b) == 1
    pool.check()


def test_free_out_of_range() -> None:
    with pytest.raises(KVStateError, match="block 9 is outside 0..3"):
        BlockPool(4).free([9])


def test_free_nothing_is_fine() -> None:
    pool = BlockPool(2)
    pool.free([])
    pool.incref([])
    pool.check()


# ---- refcount / check / used_block_ids ---------------------------------------------------


def test_refcount_out_of_range() -> None:
    with pytest.raises(KVStateError, match="block 4 is outside"):
        BlockPool(4).refcount(4)


def test_used_block_ids() -> None:
    pool = BlockPool(6)
    ids = pool.allocate(3)
    pool.free(ids[:1])
    assert set(pool.used_block_ids()) == set(ids[1:])


def test_check_catches_duplicate_in_free_list() -> None:
    pool = BlockPool(3)
    pool._free.append(0)
    with pytest.raises(KVStateError, match="duplicates"):
        pool.check()


def test_check_catches_free_and_used() -> None:
    pool = BlockPool(3)
    pool._refcounts[1] = 1
    with pytest.raises(KVStateError, match=r"both free and referenced: \[1\]"):
        pool.check()


def test_check_catches_lost_block() -> None:
    pool = BlockPool(3)
    pool._free.pop()
    with pytest.raises(KVStateError, match="2 free \\+ 0 used != 3"):
        pool.check()


def test_check_catches_zero_refcount() -> None:
    pool = BlockPool(3)
    pool._free.remove(2)
    pool._refcounts[2] = 0
    with pytest.raises(KVStateError, match="refcount < 1"):
        pool.check()


def test_check_catches_out_of_range_id() -> None:
    pool = BlockPool(3)
    pool._free.append(7)
    pool._free.remove(0)
    with pytest.raises(KVStateError, match=r"outside 0..2: \[7\]"):
        pool.check()


def test_large_pool() -> None:
    # 10^5 blocks: every call is O(ids passed), so this churn stays cheap.
    n = 100_000
    pool = BlockPool(n)
    held = [pool.allocate(16) for _ in range(n // 16)]
    assert pool.num_free == n % 16
    for _ in range(3):
        for i in range(0, len(held), 2):
            pool.free(held[i])
        for i in range(0, len(held), 2):
            held[i] = pool.allocate(16)
    pool.check()
    for ids in held:
        pool.free(ids)
    assert pool.num_free == n
    pool.check()


# ---- stateful ----------------------------------------------------------------------------


class BlockPoolMachine(RuleBasedStateMachine):
    """The pool against a model: ``owned`` maps each used block to its expected refcount."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(0)
        self.owned: Counter[int] = Counter()

    @initialize(num_blocks=st.integers(1, 24))
    def make(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks)

    @rule(n=st.integers(0, 26))
    def allocate(self, n: int) -> None:
        free_before = self.pool.num_free
        if n > free_before:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            assert self.pool.num_free == free_before
            return
        ids = self.pool.allocate(n)
        assert len(ids) == len(set(ids)) == n
        assert not set(ids) & set(self.owned)
        self.owned.update(ids)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def incref(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.owned)), max_size=4))
        self.pool.incref(ids)
        self.owned.update(ids)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        refs = sorted(self.owned.elements())
        ids = data.draw(st.lists(st.sampled_from(refs), max_size=6))
        if any(n > self.owned[b] for b, n in Counter(ids).items()):
            with pytest.raises(KVStateError):
                self.pool.free(ids)
            return
        self.pool.free(ids)
        self.owned.subtract(ids)
        self.owned = +self.owned  # drop zero counts

    @rule(data=st.data())
    def misuse_free_block(self, data: st.DataObject) -> None:
        free_ids = [b for b in range(self.pool.num_blocks) if b not in self.owned]
        if not free_ids:
            return
        b = data.draw(st.sampled_from(free_ids))
        with pytest.raises(KVStateError, match=str(b)):
            self.pool.free([b])
        with pytest.raises(KVStateError, match=str(b)):
            self.pool.incref([b])

    @invariant()
    def matches_model(self) -> None:
        self.pool.check()
        pool = self.pool
        assert pool.num_free + pool.num_used == pool.num_blocks
        assert pool.num_used == len(self.owned)
        assert set(pool.used_block_ids()) == set(self.owned)
        for b in range(pool.num_blocks):
            assert pool.refcount(b) == self.owned[b]

    def teardown(self) -> None:
        self.pool.free(list(self.owned.elements()))
        assert self.pool.num_free == self.pool.num_blocks
        self.pool.check()


BlockPoolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_pool_stateful = BlockPoolMachine.TestCase
