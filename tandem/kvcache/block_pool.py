"""A fixed pool of KV block ids with a free list and reference counts (pure Python).

A block is a slot of ``block_size`` tokens in one tier's KV tensors; this module only
hands out its integer id. Each used block has a reference count: one per owner (a request
table, an export in flight, a pending import). Sharing a block (fork, prefix sharing)
adds a reference; the block returns to the free list when its last reference goes.

Invariants (checked by ``check()``):
    free list has no duplicates, and ``free list ∪ used`` = ``{0 .. num_blocks-1}``, disjoint
    a block is on the free list  <=>  its refcount is 0
    ``num_free + num_used == num_blocks``

Reuse order is FIFO: a freed block goes to the back of the queue and the block freed
longest ago is handed out first. The free list is then an LRU eviction order, so the
contents of a recently freed block survive as long as possible; a prefix cache can later
revive them without recomputing (vLLM v1 keeps its free queue in the same order). LIFO
would buy nothing here: block ids index GPU tensors, not CPU caches.

Every call is O(number of ids passed); nothing scans the whole pool except ``__init__``
and ``check()``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks; the call that raised it allocated nothing."""


class KVStateError(RuntimeError):
    """The KV bookkeeping was misused (unknown request, double free, id clash, ...).

    Also raised by ``check()`` / audits when an invariant is broken.
    """


class BlockPool:
    """A fixed set of block ids ``0..num_blocks-1`` with a free list and reference counts."""

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        # Free ids, FIFO: allocate pops the left end, free appends on the right.
        self._free: deque[int] = deque(range(num_blocks))
        # Used ids only -> refcount >= 1. A block is free iff it is not a key here.
        self._refcounts: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"BlockPool(num_blocks={self.num_blocks}, num_free={self.num_free})"

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refcounts)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with refcount 1. All or nothing.

        Raises ``NoFreeBlocksError`` (allocating nothing) if ``n > num_free``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of blocks to allocate must be an int >= 0, got {n!r}")
        if n > len(self._free):
            raise NoFreeBlocksError(
                f"cannot allocate {n} blocks: {len(self._free)} of {self.num_blocks} free"
            )
        popleft = self._free.popleft
        ids = [popleft() for _ in range(n)]
        refcounts = self._refcounts
        for block_id in ids:
            refcounts[block_id] = 1
        return ids

    def incref(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each id (an id listed twice gains two). All or nothing.

        Only used blocks can be shared: ``KVStateError`` on a free or unknown id.
        """
        refcounts = self._refcounts
        for block_id in block_ids:
            if block_id not in refcounts:
                self._validate_id(block_id)
                raise KVStateError(f"cannot share block {block_id}: it is free")
        for block_id in block_ids:
            refcounts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per listed id; a block at 0 goes back to the free list.

        All or nothing: ``KVStateError`` (changing nothing) if an id is free, unknown, or
        listed more times than it has references.
        """
        refcounts = self._refcounts
        drops = Counter(block_ids)
        for block_id, n in drops.items():
            have = refcounts.get(block_id, 0)
            if n > have:
                self._validate_id(block_id)
                if have == 0:
                    raise KVStateError(f"double free of block {block_id}: it is already free")
                raise KVStateError(
                    f"cannot free block {block_id} {n} times: it has only {have} references"
                )
        append = self._free.append
        # Iterate the caller's order, not the Counter's, so reuse order follows it.
        for block_id in block_ids:
            left = refcounts[block_id] - 1
            if left:
                refcounts[block_id] = left
            else:
                del refcounts[block_id]
                append(block_id)

    def refcount(self, block_id: int) -> int:
        """References to ``block_id``; 0 for a free block."""
        count = self._refcounts.get(block_id)
        if count is None:
            self._validate_id(block_id)
            return 0
        return count

    def used_block_ids(self) -> Iterable[int]:
        """The used ids, in no particular order. O(num_used); do not mutate while iterating."""
        return self._refcounts.keys()

    def check(self) -> None:
        """Verify the invariants in O(num_blocks); raises ``KVStateError`` on the first break."""
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dupes = sorted(b for b, n in Counter(self._free).items() if n > 1)
            raise KVStateError(f"free list holds duplicates: {dupes}")
        both = free_set.intersection(self._refcounts)
        if both:
            raise KVStateError(f"blocks both free and referenced: {sorted(both)}")
        bad_counts = sorted(b for b, n in self._refcounts.items() if n < 1)
        if bad_counts:
            raise KVStateError(f"used blocks with refcount < 1: {bad_counts}")
        out_of_range = sorted(
            b for b in free_set.union(self._refcounts) if not 0 <= b < self.num_blocks
        )
        if out_of_range:
            raise KVStateError(f"block ids outside 0..{self.num_blocks - 1}: {out_of_range}")
        if len(free_set) + len(self._refcounts) != self.num_blocks:
            raise KVStateError(
                f"{len(free_set)} free + {len(self._refcounts)} used != {self.num_blocks} blocks"
            )

    def _validate_id(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            raise KVStateError(f"block id must be an int, got {block_id!r}")
        if not 0 <= block_id < self.num_blocks:
            raise KVStateError(f"block {block_id} is outside 0..{self.num_blocks - 1}")
