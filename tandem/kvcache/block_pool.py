"""A fixed pool of KV block ids with reference counts and a prefix cache (pure Python).

A block is a slot of ``block_size`` tokens in one tier's KV tensors; this module only
hands out its integer id. Each used block has a reference count: one per owner (a request
table, an export in flight, a pending import). Sharing a block (fork, prefix sharing)
adds a reference.

Prefix caching: a used block whose K/V are final (a full, computed block) may be given a
content name (``cache``, see ``prefix.py``). When the last reference to a named block
goes, the block is not emptied: it becomes *evictable*, keeping its name and its bytes, so
a later request with the same prefix can take it back (``acquire``) without computing it.
Evictable blocks are handed out by ``allocate`` only when no empty block is left, least
recently released first (LRU), and only then lose their name (an eviction).

Every block is in exactly one of three states:

    empty       refcount 0, no name             ``_free`` (FIFO)
    evictable   refcount 0, named               ``_evictable`` (LRU: oldest first)
    used        refcount >= 1, named or not     ``_refcounts``

Invariants (checked by ``check()``):
    the three sets partition ``{0 .. num_blocks-1}``; ``_free`` has no duplicates
    ``_name_of`` and ``_block_of`` are inverse maps; no empty block has a name
    ``num_free`` (blocks ``allocate`` can hand out) ``= empty + evictable``

Reuse order of empty blocks is FIFO: a freed block goes to the back of the queue.

Every call is O(number of ids passed) (an eviction is O(1)); nothing scans the whole pool
except ``__init__`` and ``check()``: the pool holds 10^5 blocks on a large GPU.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

BlockName = bytes
EvictHook = Callable[[int, BlockName], None]


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks; the call that raised it allocated nothing."""


class KVStateError(RuntimeError):
    """The KV bookkeeping was misused (unknown request, double free, id clash, ...).

    Also raised by ``check()`` / audits when an invariant is broken.
    """


class BlockPool:
    """A fixed set of block ids ``0..num_blocks-1`` with refcounts and named blocks.

    ``on_evict(block_id, name)``, if given, is called for each named block ``allocate``
    evicts, before the id is handed out (the hierarchical cache copies it to the host).
    """

    def __init__(self, num_blocks: int, on_evict: EvictHook | None = None) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        # Empty ids, FIFO: allocate pops the left end, free appends on the right.
        self._free: deque[int] = deque(range(num_blocks))
        # Named ids with refcount 0, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # Used ids only -> refcount >= 1.
        self._refcounts: dict[int, int] = {}
        self._name_of: dict[int, BlockName] = {}
        self._block_of: dict[BlockName, int] = {}
        self.on_evict = on_evict
        self.num_evictions = 0

    def __repr__(self) -> str:
        return (
            f"BlockPool(num_blocks={self.num_blocks}, num_free={self.num_free}, "
            f"cached={self.num_cached})"
        )

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: empty ones, then evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_empty(self) -> int:
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return len(self._refcounts)

    @property
    def num_cached(self) -> int:
        """Named blocks, used or evictable."""
        return len(self._name_of)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, each with refcount 1 and no name. All or nothing.

        Empty blocks first; then evicts the least recently released cached blocks.
        Raises ``NoFreeBlocksError`` (allocating nothing) if ``n > num_free``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of blocks to allocate must be an int >= 0, got {n!r}")
        free = self._free
        if n > len(free) + len(self._evictable):
            raise NoFreeBlocksError(
                f"cannot allocate {n} blocks: {self.num_free} of {self.num_blocks} free"
            )
        take = min(n, len(free))
        popleft = free.popleft
        ids = [popleft() for _ in range(take)]
        for _ in range(n - take):
            ids.append(self._evict_one())
        refcounts = self._refcounts
        for block_id in ids:
            refcounts[block_id] = 1
        return ids

    def _evict_one(self) -> int:
        block_id, _ = self._evictable.popitem(last=False)
        name = self._name_of.pop(block_id)
        del self._block_of[name]
        self.num_evictions += 1
        if self.on_evict is not None:
            self.on_evict(block_id, name)
        return block_id

    def incref(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each id (an id listed twice gains two). All or nothing.

        Only used blocks can be shared: ``KVStateError`` on an unused or unknown id
        (``acquire`` takes back evictable ones).
        """
        refcounts = self._refcounts
        for block_id in block_ids:
            if block_id not in refcounts:
                self._validate_id(block_id)
                raise KVStateError(f"cannot share block {block_id}: it is free")
        for block_id in block_ids:
            refcounts[block_id] += 1

    def acquire(self, block_ids: Sequence[int]) -> int:
        """Add one reference to each named block, used or evictable (a prefix-cache hit).
        All or nothing: ``KVStateError`` on a block without a name. Returns how many were
        evictable (taking them lowered ``num_free`` by that much)."""
        name_of = self._name_of
        for block_id in block_ids:
            if block_id not in name_of:
                self._validate_id(block_id)
                raise KVStateError(f"cannot acquire block {block_id}: it is not cached")
        refcounts, evictable = self._refcounts, self._evictable
        revived = 0
        for block_id in block_ids:
            count = refcounts.get(block_id)
            if count is None:
                del evictable[block_id]
                refcounts[block_id] = 1
                revived += 1
            else:
                refcounts[block_id] = count + 1
        return revived

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per listed id; a block at 0 becomes empty, or evictable if
        it has a name (most recently released: evicted last, in the order listed).

        All or nothing: ``KVStateError`` (changing nothing) if an id is unused, unknown, or
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
        named = self._name_of
        evictable = self._evictable
        # Iterate the caller's order, not the Counter's, so reuse order follows it.
        for block_id in block_ids:
            left = refcounts[block_id] - 1
            if left:
                refcounts[block_id] = left
            else:
                del refcounts[block_id]
                if block_id in named:
                    evictable[block_id] = None
                else:
                    append(block_id)

    # ---- names -----------------------------------------------------------------------

    def cache(self, block_id: int, name: BlockName) -> bool:
        """Name a used block whose K/V are final. False (nothing changes) if another block
        already has that name (the same prefix was computed twice at once: this copy
        stays private). ``KVStateError`` if the block is unused or has another name."""
        if block_id not in self._refcounts:
            self._validate_id(block_id)
            raise KVStateError(f"cannot cache block {block_id}: it is not in use")
        have = self._name_of.get(block_id)
        if have is not None:
            if have == name:
                return True
            raise KVStateError(f"block {block_id} is already cached under another name")
        if name in self._block_of:
            return False
        self._name_of[block_id] = name
        self._block_of[name] = block_id
        return True

    def lookup(self, name: BlockName) -> int | None:
        """The block holding ``name``, used or evictable; None if not cached."""
        return self._block_of.get(name)

    def name_of(self, block_id: int) -> BlockName | None:
        return self._name_of.get(block_id)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._name_of

    def evict_all(self) -> int:
        """Empty every evictable block (names dropped, the hook told); returns how many.
        For a cache reset; in-use named blocks keep their names."""
        n = len(self._evictable)
        while self._evictable:
            self._free.append(self._evict_one())
        return n

    def refcount(self, block_id: int) -> int:
        """References to ``block_id``; 0 for an empty or evictable block."""
        count = self._refcounts.get(block_id)
        if count is None:
            self._validate_id(block_id)
            return 0
        return count

    def used_block_ids(self) -> Iterable[int]:
        """The used ids, in no particular order. O(num_used); do not mutate while iterating."""
        return self._refcounts.keys()

    def evictable_block_ids(self) -> Iterable[int]:
        """Evictable ids, least recently released first. Do not mutate while iterating."""
        return self._evictable.keys()

    def check(self) -> None:
        """Verify the invariants in O(num_blocks); raises ``KVStateError`` on the first break."""
        free_set = set(self._free)
        if len(free_set) != len(self._free):
            dupes = sorted(b for b, n in Counter(self._free).items() if n > 1)
            raise KVStateError(f"free list holds duplicates: {dupes}")
        evictable = set(self._evictable)
        both = free_set.intersection(self._refcounts)
        if both:
            raise KVStateError(f"blocks both free and referenced: {sorted(both)}")
        both = evictable.intersection(self._refcounts) | evictable.intersection(free_set)
        if both:
            raise KVStateError(f"evictable blocks also free or referenced: {sorted(both)}")
        bad_counts = sorted(b for b, n in self._refcounts.items() if n < 1)
        if bad_counts:
            raise KVStateError(f"used blocks with refcount < 1: {bad_counts}")
        everything = free_set | evictable | set(self._refcounts)
        out_of_range = sorted(b for b in everything if not 0 <= b < self.num_blocks)
        if out_of_range:
            raise KVStateError(f"block ids outside 0..{self.num_blocks - 1}: {out_of_range}")
        if len(free_set) + len(evictable) + len(self._refcounts) != self.num_blocks:
            raise KVStateError(
                f"{len(free_set) + len(evictable)} free + {len(self._refcounts)} used "
                f"!= {self.num_blocks} blocks"
            )
        problems = self.cache_problems()
        if problems:
            raise KVStateError(problems[0])

    def cache_problems(self) -> list[str]:
        """Breaks of the name invariants, O(named blocks); ``[]`` when sound."""
        problems = []
        unnamed = sorted(b for b in self._evictable if b not in self._name_of)
        if unnamed:
            problems.append(f"evictable blocks without a name: {unnamed}")
        for b in self._name_of:
            if b not in self._refcounts and b not in self._evictable:
                problems.append(f"empty block {b} keeps a name")
                break
        if len(self._block_of) != len(self._name_of) or any(
            self._block_of.get(name) != b for b, name in self._name_of.items()
        ):
            problems.append("the block -> name and name -> block maps disagree")
        return problems

    def _validate_id(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            raise KVStateError(f"block id must be an int, got {block_id!r}")
        if not 0 <= block_id < self.num_blocks:
            raise KVStateError(f"block {block_id} is outside 0..{self.num_blocks - 1}")
