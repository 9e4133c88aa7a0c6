"""Block tables of one memory tier, and the export/import primitive (pure Python).

A ``KVCacheManager`` owns one ``BlockPool`` (the device's or the host's blocks) and maps
each request id to its block table: the ordered block ids that hold its K/V, token ``t``
in block ``table[t // block_size]`` at slot ``t % block_size``.

Every used block has one reference per owner, and there are exactly four kinds of owner:

    table    a live request's block table (``allocate``, ``fork``, ``commit_import``)
    export   blocks detached from a table while their bytes are copied out
    import   blocks reserved for bytes being copied in, not yet a table
    pin      cached blocks held while their bytes are read (a prefix-cache load), ``pin``

Handoff (prefill -> decode), offload (device -> host) and migration (decode -> decode) are
all the same two-sided move, written here once::

    source tier                              destination tier
    exp = src.export(rid, n)                 dst.reserve_import(rid, n) -> ids to write
              ... bytes of exp.block_ids are copied into the reserved ids ...
    done:     src.release_export(exp)        dst.commit_import(rid)     -> rid's table
    aborted:  src.restore_export(exp)        dst.abort_import(rid)

The order of the two sides does not matter to the bookkeeping; the transfer layer
(``kvtransfer/``) drives it. While an export or import is open its blocks stay owned by
it, so a copy in flight never reads or writes a block that was handed to someone else:
``free(rid)`` touches only the table, never an export or a pending import.

Staged (live) migration copies a request's full blocks while it keeps decoding on the
source, so the source needs no export until the final stop-and-copy; the destination grows
one pending import stage by stage (``reserve_import`` for the first stage, ``extend_import``
for each later one) and commits or aborts it as a whole.

Prefix caching (``prefix.py`` names the blocks, ``BlockPool`` keeps them): a table's
leading FULL blocks whose K/V are computed are given their content names
(``cache_blocks``); when freed they stay in the pool as evictable until a free block is
needed. A new request starts its table with the longest named prefix it matches
(``match_prefix`` then ``adopt_prefix``) and computes only the rest. Only full blocks are
ever named or shared, and a request writes only at positions past its computed tokens,
which lie in its own unnamed blocks: a shared block is never written (``check_writable``
enforces it for every chunk the scheduler builds), and never freed or moved under another
owner (each owner holds a reference; exports move references, not blocks).

Not here: copy-on-write of a shared partial last block after ``fork`` (the caller must
not write into a block whose refcount is above 1).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.kvcache.block_pool import BlockPool, EvictHook, KVStateError, NoFreeBlocksError
from tandem.kvcache.prefix import BlockHash, short_hash, summary_depth


@dataclass(frozen=True)
class KVExport:
    """A request's blocks detached from its table, owned by the export until released or
    restored. Compared by value: a rebuilt copy of an open export refers to it."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # tokens whose K/V the blocks hold (the last block may be partial)


@dataclass(frozen=True)
class KVAudit:
    """Who owns which blocks of one tier; ``ok`` iff every used block is owned exactly as counted."""

    num_blocks: int
    num_free: int
    num_used: int
    in_tables: int  # distinct blocks referenced by live request tables
    in_exports: int  # distinct blocks held by exports not yet released
    in_imports: int  # distinct blocks reserved for imports not yet committed
    leaked: tuple[int, ...]  # used blocks that nothing owns (must be empty)
    refcount_mismatch: tuple[int, ...]  # blocks whose refcount != number of owners (must be empty)
    num_cached: int = 0  # named blocks, used or evictable
    num_evictable: int = 0  # named blocks nobody references (counted in num_free)
    # Breaks of the pool's cache invariants (names vs states, see BlockPool) -- must be empty.
    cache_errors: tuple[str, ...] = ()
    # Unnamed blocks held by two or more owners. Only ``fork`` makes these (the scheduler
    # never forks): with prefix caching alone, every shared block is a named full block.
    shared_unnamed: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return (
            not self.leaked
            and not self.refcount_mismatch
            and not self.cache_errors
            and self.num_free + self.num_used == self.num_blocks
        )


@dataclass
class _PendingImport:
    block_ids: list[int]
    num_tokens: int
    num_held: int = 0  # leading blocks already cached here (shared, not written)


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _check_tokens(num_tokens: int) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")


class KVCacheManager:
    """Block tables of one memory tier (device or host).

    At most one owner record per request id and kind: one table, one open export, one
    pending import. A request may have a table and an open export at once (it was
    exported, then allocated again here); restoring that export is then an error.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        tier: str = "device",
        on_evict: EvictHook | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(tier, str) or not tier:
            raise ValueError(f"tier must be a non-empty name, got {tier!r}")
        self.block_size = block_size
        self.tier = tier
        # ``on_evict(block_id, name)``: told of every named block the pool evicts.
        self.on_evict = on_evict
        self.pool = BlockPool(num_blocks, self._evicted)
        # Short names of cached blocks at summary depths (prefix.summary_depth), least
        # recently cached or hit first: the compact prefix summary a router reads.
        self._summary: OrderedDict[int, None] = OrderedDict()
        self._tables: dict[str, list[int]] = {}
        # Leading blocks of a table already offered to the cache (named, or found to be a
        # duplicate of a named block), so ``cache_blocks`` is O(new blocks). Absent = 0.
        self._offered: dict[str, int] = {}
        # A stamp from one counter, renewed on every change of a request's table: equal
        # stamps mean an identical table (consumers may cache per stamp; CUDA graphs do).
        self._stamps: dict[str, int] = {}
        self._stamp_counter = itertools.count(1)
        self._exports: dict[str, KVExport] = {}
        self._imports: dict[str, _PendingImport] = {}
        self._pins: dict[int, tuple[int, ...]] = {}
        self._pin_ids = itertools.count(1)

    def __repr__(self) -> str:
        return (
            f"KVCacheManager(tier={self.tier!r}, block_size={self.block_size}, "
            f"free={self.pool.num_free}/{self.pool.num_blocks}, tables={len(self._tables)}, "
            f"exports={len(self._exports)}, imports={len(self._imports)})"
        )

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    # ---- tables ----------------------------------------------------------------------

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks the request's table needs to hold ``num_tokens`` tokens (0 if enough).

        An unknown request counts as an empty table.
        """
        _check_tokens(num_tokens)
        have = len(self._tables.get(request_id, ()))
        return max(0, _blocks_for(num_tokens, self.block_size) - have)

    def _covers(self, request_id: str, num_tokens: int) -> bool:
        """The request's table already holds ``num_tokens`` (a valid count): the fast path
        of ``can_allocate`` and ``allocate``, without ``blocks_needed``'s validation."""
        table = self._tables.get(request_id)
        return (
            table is not None
            and type(num_tokens) is int
            and 0 <= num_tokens <= len(table) * self.block_size
        )

    def can_allocate(self, request_id: str, num_tokens: int, reserve: int = 0) -> bool:
        """Whether ``allocate(request_id, num_tokens)`` would leave at least ``reserve`` free."""
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        if self._covers(request_id, num_tokens):
            return reserve <= self.pool.num_free  # the decode hot path: no new block
        return self.blocks_needed(request_id, num_tokens) + reserve <= self.pool.num_free

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table (creating it if needed) to cover ``num_tokens`` tokens.

        Returns the newly added ids (``[]`` if the table was already big enough; it never
        shrinks). All or nothing: on ``NoFreeBlocksError`` the table is as it was, and an
        unknown request still has no table. ``KVStateError`` if the request has a pending
        import here (commit or abort it first).
        """
        if request_id in self._imports:
            raise KVStateError(
                f"request {request_id!r} has a pending import on {self.tier}; "
                "commit or abort it before allocating"
            )
        if self._covers(request_id, num_tokens):
            return []  # the decode hot path: the table already covers it
        need = self.blocks_needed(request_id, num_tokens)
        try:
            new_ids = self.pool.allocate(need)
        except NoFreeBlocksError:
            raise NoFreeBlocksError(
                f"request {request_id!r} needs {need} more blocks for {num_tokens} tokens; "
                f"{self.pool.num_free} of {self.pool.num_blocks} free on {self.tier}"
            ) from None
        self._tables.setdefault(request_id, []).extend(new_ids)
        self._stamps[request_id] = next(self._stamp_counter)
        return new_ids

    def table_stamp(self, request_id: str) -> int | None:
        """The stamp of the request's current table (None without one); see ``__init__``."""
        return self._stamps.get(request_id)

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order (a copy); ``[]`` if it has no table."""
        return list(self._tables.get(request_id, ()))

    def has(self, request_id: str) -> bool:
        """Whether the request has a table here (exports and pending imports do not count)."""
        return request_id in self._tables

    def num_tokens_capacity(self, request_id: str) -> int:
        """Tokens the request's table can hold: ``len(table) * block_size`` (0 if none)."""
        return len(self._tables.get(request_id, ())) * self.block_size

    def free(self, request_id: str) -> None:
        """Free the request's table. A no-op for a request without one.

        Idempotent on purpose: abort and cancel paths may race with normal completion,
        and calling ``free`` twice must be harmless. It leaves the request's open export
        and pending import alone: bytes may still be moving through those blocks, and
        only the transfer that owns them may end them.
        """
        table = self._tables.pop(request_id, None)
        self._stamps.pop(request_id, None)
        self._offered.pop(request_id, None)
        if table:
            # Tail first: the blocks at the end of a chain are evicted before its head,
            # which other requests are likelier to share.
            self.pool.free(table[::-1])

    def fork(self, parent_id: str, child_id: str) -> None:
        """Give ``child_id`` a table that shares every block of ``parent_id``'s (refcount + 1).

        ``KVStateError`` if the parent has no table, or the child has a table or a pending
        import here.
        """
        parent = self._tables.get(parent_id)
        if parent is None:
            raise KVStateError(f"cannot fork {parent_id!r} on {self.tier}: it has no table")
        self._check_id_free(child_id, f"fork {parent_id!r} into it")
        self.pool.incref(parent)
        self._tables[child_id] = list(parent)
        self._stamps[child_id] = next(self._stamp_counter)

    # ---- prefix cache ----------------------------------------------------------------

    def match_prefix(self, names: Sequence[BlockHash], max_blocks: int | None = None) -> list[int]:
        """Blocks of this tier holding the longest prefix of ``names`` (a request's block
        names in order), at most ``max_blocks``. Takes no reference. O(blocks matched)."""
        lookup = self.pool.lookup
        hit: list[int] = []
        limit = len(names) if max_blocks is None else min(max_blocks, len(names))
        for i in range(limit):
            block_id = lookup(names[i])
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def num_reviving(self, block_ids: Sequence[int]) -> int:
        """How many of these named blocks are evictable (``adopt_prefix`` takes them out of
        ``num_free``)."""
        refcount = self.pool.refcount
        return sum(1 for b in block_ids if refcount(b) == 0)

    def adopt_prefix(self, request_id: str, block_ids: Sequence[int]) -> None:
        """Start the request's table with cached blocks (``match_prefix``'s answer), one
        more reference each. ``KVStateError`` (changing nothing) if the request has a
        table or a pending import here, or a block is not cached."""
        self._check_id_free(request_id, "adopt a cached prefix")
        self.pool.acquire(block_ids)
        self._tables[request_id] = list(block_ids)
        self._offered[request_id] = len(block_ids)
        self._stamps[request_id] = next(self._stamp_counter)
        self._touch(block_ids)

    def cache_blocks(self, request_id: str, names: Sequence[BlockHash], num_tokens: int) -> int:
        """Name the request's full blocks within its first ``num_tokens`` tokens, whose K/V
        must be final (computed), ``names[i]`` for block ``i``. A block whose name another
        block already holds stays private. Returns the blocks newly named; O(new blocks).
        ``KVStateError`` if the request has no table or ``names`` is too short."""
        start = self._offered.get(request_id, 0)
        if num_tokens // self.block_size <= start:
            return 0  # the decode hot path: no block filled since the last call
        table = self._tables.get(request_id)
        if table is None:
            raise KVStateError(f"cannot cache blocks of {request_id!r} on {self.tier}: no table")
        full = min(num_tokens // self.block_size, len(table))
        if full <= start:
            return 0
        if len(names) < full:
            raise KVStateError(
                f"{request_id!r} has {full} full blocks on {self.tier} but {len(names)} names"
            )
        cache = self.pool.cache
        named = 0
        for i in range(start, full):
            if cache(table[i], names[i]):
                named += 1
                if summary_depth(i):
                    key = short_hash(names[i])
                    self._summary[key] = None
                    self._summary.move_to_end(key)
        self._offered[request_id] = full
        return named

    def prefix_summary(self, max_entries: int) -> list[int]:
        """Short names of cached blocks at summary depths, most recently used first, at
        most ``max_entries``: what a router needs to estimate a prompt's hit length here
        (``prefix.summary_depth``). O(max_entries)."""
        out: list[int] = []
        for key in reversed(self._summary):
            if len(out) >= max_entries:
                break
            out.append(key)
        return out

    def _touch(self, block_ids: Sequence[int]) -> None:
        """A prefix hit: its summary entries become the most recently used."""
        summary, name_of = self._summary, self.pool.name_of
        n = 1
        while n <= len(block_ids):  # indexes 0, 1, 3, 7, ...: summary_depth
            name = name_of(block_ids[n - 1])
            if name is not None:
                key = short_hash(name)
                if key in summary:
                    summary.move_to_end(key)
            n *= 2

    def _evicted(self, block_id: int, name: BlockHash) -> None:
        self._summary.pop(short_hash(name), None)
        if self.on_evict is not None:
            self.on_evict(block_id, name)

    def num_releasable(self, request_id: str) -> int:
        """Blocks of the request's table that freeing it would make allocatable: those it
        alone references. O(table)."""
        refcount = self.pool.refcount
        return sum(1 for b in self._tables.get(request_id, ()) if refcount(b) == 1)

    def check_writable(self, request_id: str, start: int, end: int) -> None:
        """``KVStateError`` unless the blocks holding positions ``[start, end)`` of the
        request's table are its own: one reference and no name. A chunk that would write a
        shared or cached block is a bug (it would change another request's K/V)."""
        if end <= start:
            return
        table = self._tables.get(request_id, ())
        pool = self.pool
        refcounts, named = pool._refcounts, pool._name_of  # hot path: once per chunk
        for i in range(start // self.block_size, (end - 1) // self.block_size + 1):
            if i >= len(table):
                raise KVStateError(f"{request_id!r} writes position {end - 1} past its table")
            b = table[i]
            if refcounts.get(b) != 1 or b in named:
                raise KVStateError(
                    f"{request_id!r} would write block {b} (table index {i}) on {self.tier}, "
                    f"which is shared or cached (refcount {pool.refcount(b)})"
                )

    def pin(self, block_ids: Sequence[int]) -> int:
        """Hold cached blocks (used or evictable) while their bytes are read elsewhere;
        returns the pin to ``unpin``. ``KVStateError`` (nothing held) on an unnamed block."""
        self.pool.acquire(block_ids)
        pin = next(self._pin_ids)
        self._pins[pin] = tuple(block_ids)
        return pin

    def unpin(self, pin: int) -> None:
        """Drop a pin's references. ``KVStateError`` if it is not held."""
        ids = self._pins.pop(pin, None)
        if ids is None:
            raise KVStateError(f"pin {pin} is not held on {self.tier}")
        self.pool.free(ids)

    @property
    def num_pins(self) -> int:
        return len(self._pins)

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached

    @property
    def num_evictions(self) -> int:
        return self.pool.num_evictions

    # ---- export: blocks leave this tier ----------------------------------------------

    def export(self, request_id: str, num_tokens: int) -> KVExport:
        """Detach the request's table: its first ``ceil(num_tokens / block_size)`` blocks
        move to the returned export; any blocks after them are freed. The request has no
        table here afterwards.

        ``KVStateError`` if the request has no table, holds fewer than ``num_tokens``
        tokens of room, or already has an open export here.
        """
        _check_tokens(num_tokens)
        table = self._tables.get(request_id)
        if table is None:
            raise KVStateError(f"cannot export {request_id!r} from {self.tier}: it has no table")
        if request_id in self._exports:
            raise KVStateError(
                f"cannot export {request_id!r} from {self.tier}: its previous export is still "
                "open (release or restore it first)"
            )
        keep = _blocks_for(num_tokens, self.block_size)
        if keep > len(table):
            raise KVStateError(
                f"cannot export {num_tokens} tokens of {request_id!r} from {self.tier}: "
                f"its table holds only {len(table) * self.block_size}"
            )
        del self._tables[request_id]
        self._stamps.pop(request_id, None)
        self._offered.pop(request_id, None)
        if keep < len(table):
            self.pool.free(table[keep:][::-1])
        exp = KVExport(request_id=request_id, block_ids=tuple(table[:keep]), num_tokens=num_tokens)
        self._exports[request_id] = exp
        return exp

    def release_export(self, export: KVExport) -> None:
        """The copy is done: free the export's blocks. ``KVStateError`` if it is not open."""
        self._take_export(export, "release")
        self.pool.free(export.block_ids[::-1])

    def restore_export(self, export: KVExport) -> None:
        """The copy was aborted: the export's blocks become the request's table again.

        ``KVStateError`` (changing nothing) if the export is not open, or if the request
        has a table or a pending import here meanwhile.
        """
        self._find_export(export, "restore")
        self._check_id_free(export.request_id, "restore its export")
        del self._exports[export.request_id]
        self._tables[export.request_id] = list(export.block_ids)
        self._stamps[export.request_id] = next(self._stamp_counter)

    def open_exports(self) -> list[KVExport]:
        return list(self._exports.values())

    # ---- import: blocks arrive in this tier ------------------------------------------

    def reserve_import(
        self, request_id: str, num_tokens: int, held: Sequence[int] = ()
    ) -> list[int]:
        """Reserve ``ceil(num_tokens / block_size)`` blocks for incoming K/V, in token order.

        They are pending (owned by the import, not yet a table). ``held``: cached blocks
        of this tier that already hold the first ``len(held)`` full blocks
        (``match_prefix``); the import takes a reference to each, and only the blocks
        after them are reserved and returned (the bytes to write). ``NoFreeBlocksError``
        reserves nothing; ``KVStateError`` if the request has a table or a pending import
        here, or ``held`` is not cached or covers more than the full blocks.
        """
        _check_tokens(num_tokens)
        self._check_id_free(request_id, "reserve an import")
        if len(held) > num_tokens // self.block_size:
            raise KVStateError(
                f"{len(held)} held blocks for {num_tokens} tokens of {request_id!r}: only "
                "full blocks can be shared"
            )
        self.pool.acquire(held)
        try:
            ids = self._reserve(request_id, num_tokens - len(held) * self.block_size, "import")
        except NoFreeBlocksError:
            self.pool.free(list(held)[::-1])
            raise
        self._imports[request_id] = _PendingImport(
            block_ids=[*held, *ids], num_tokens=num_tokens, num_held=len(held)
        )
        return list(ids)

    def pending_import_held(self, request_id: str) -> list[int]:
        """The cached blocks the request's pending import shares (``reserve_import``'s
        ``held``); ``[]`` if none or no import is pending."""
        pending = self._imports.get(request_id)
        return [] if pending is None else pending.block_ids[: pending.num_held]

    def extend_import(self, request_id: str, num_tokens: int) -> list[int]:
        """Reserve ``ceil(num_tokens / block_size)`` more blocks for the request's pending
        import (a later stage of a migration); returns the new ids, which follow the
        pending ones in token order. ``KVStateError`` if no import is pending;
        ``NoFreeBlocksError`` reserves nothing."""
        _check_tokens(num_tokens)
        pending = self._imports.get(request_id)
        if pending is None:
            raise KVStateError(
                f"cannot extend the import of {request_id!r} on {self.tier}: none is pending"
            )
        ids = self._reserve(request_id, num_tokens, "extend the import of")
        pending.block_ids.extend(ids)
        pending.num_tokens += num_tokens
        return list(ids)

    def pending_import_blocks(self, request_id: str) -> int:
        """Blocks reserved for the request's pending import (0 if none)."""
        pending = self._imports.get(request_id)
        return 0 if pending is None else len(pending.block_ids)

    def commit_import(self, request_id: str) -> list[int]:
        """The bytes have arrived: the pending blocks become the request's table (returned)."""
        pending = self._imports.get(request_id)
        if pending is None:
            raise KVStateError(
                f"cannot commit import of {request_id!r} on {self.tier}: none is pending"
            )
        # allocate/fork/restore refuse ids with a pending import, so no table exists.
        assert request_id not in self._tables
        del self._imports[request_id]
        self._tables[request_id] = pending.block_ids
        self._stamps[request_id] = next(self._stamp_counter)
        return list(pending.block_ids)

    def abort_import(self, request_id: str) -> None:
        """Free the request's pending blocks; a no-op if it has none."""
        pending = self._imports.pop(request_id, None)
        if pending is not None:
            self.pool.free(pending.block_ids[::-1])

    def pending_imports(self) -> list[str]:
        return list(self._imports)

    # ---- audit -----------------------------------------------------------------------

    def audit(self) -> KVAudit:
        """Count every block's owners across tables, exports, pending imports and pins, and
        compare with the pool; check the cache's name maps. O(used + named blocks + owned
        references); never raises."""
        owners: Counter[int] = Counter()
        in_tables: set[int] = set()
        in_exports: set[int] = set()
        in_imports: set[int] = set()
        for table in self._tables.values():
            owners.update(table)
            in_tables.update(table)
        for exp in self._exports.values():
            owners.update(exp.block_ids)
            in_exports.update(exp.block_ids)
        for pending in self._imports.values():
            owners.update(pending.block_ids)
            in_imports.update(pending.block_ids)
        for ids in self._pins.values():
            owners.update(ids)
        pool = self.pool
        used = set(pool.used_block_ids())
        leaked = sorted(b for b in used if b not in owners)
        mismatch = sorted(b for b in used.union(owners) if self._refcount_or_none(b) != owners[b])
        shared_unnamed = sorted(b for b, n in owners.items() if n > 1 and not pool.is_cached(b))
        return KVAudit(
            num_blocks=pool.num_blocks,
            num_free=pool.num_free,
            num_used=pool.num_used,
            in_tables=len(in_tables),
            in_exports=len(in_exports),
            in_imports=len(in_imports),
            leaked=tuple(leaked),
            refcount_mismatch=tuple(mismatch),
            num_cached=pool.num_cached,
            num_evictable=pool.num_evictable,
            cache_errors=tuple(pool.cache_problems()),
            shared_unnamed=tuple(shared_unnamed),
        )

    # ---- helpers ---------------------------------------------------------------------

    def _reserve(self, request_id: str, num_tokens: int, action: str) -> list[int]:
        """Blocks for ``num_tokens`` tokens, all or nothing (``NoFreeBlocksError``)."""
        need = _blocks_for(num_tokens, self.block_size)
        try:
            return self.pool.allocate(need)
        except NoFreeBlocksError:
            raise NoFreeBlocksError(
                f"cannot reserve {need} blocks to {action} {num_tokens} tokens of "
                f"{request_id!r}: {self.pool.num_free} of {self.pool.num_blocks} free "
                f"on {self.tier}"
            ) from None

    def _refcount_or_none(self, block_id: int) -> int | None:
        try:
            return self.pool.refcount(block_id)
        except KVStateError:  # an owned id outside the pool: always a mismatch
            return None

    def _check_id_free(self, request_id: str, action: str) -> None:
        if request_id in self._tables:
            raise KVStateError(
                f"cannot {action}: request {request_id!r} already has a table on {self.tier}"
            )
        if request_id in self._imports:
            raise KVStateError(
                f"cannot {action}: request {request_id!r} already has a pending import "
                f"on {self.tier}"
            )

    def _find_export(self, export: KVExport, action: str) -> None:
        current = self._exports.get(export.request_id)
        if current is None or current != export:
            raise KVStateError(
                f"cannot {action} export of {export.request_id!r} on {self.tier}: it is not "
                "open here (already released or restored, or from another tier)"
            )

    def _take_export(self, export: KVExport, action: str) -> None:
        self._find_export(export, action)
        del self._exports[export.request_id]
