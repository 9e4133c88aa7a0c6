"""The scheduler's prefix-cache manager: lookups, naming, and the hierarchical cache (pure).

The block bookkeeping (names, refcounts, LRU eviction) is ``tandem.kvcache``'s; this
module decides when to use it, for one scheduler:

- **Lookup** (``take``): a waiting request's table starts with its longest prefix of
  named device blocks, then — with a host tier — continues with the longest run of
  named host blocks after it, loaded into new device blocks by a ``cache_in`` copy.
  Together they stop one token short of the request's tokens (the pass that finishes
  the prompt needs a token to produce logits). ``drop`` undoes a take for a request the
  scheduler does not admit now; ``admitted`` records the hit and emits the copies.
- **Naming** (``computed``): full blocks are named once computed, so later requests can
  share them; after a request's last reference goes they stay cached, evictable.
- **Hierarchical cache** (host tier, not int8): a named device block evicted while the
  scheduler builds an iteration is written to the host tier's cache (a ``cache_out``
  copy, before anything reuses it) unless the host already holds that name; a swapped
  out request's host blocks are named too. Host blocks are evicted LRU like device ones.
  Evictions outside ``schedule()`` (an import reserving blocks between steps) are not
  written back: the bytes are overwritten before the next iteration could copy them.

Copy safety (order in ``sched/output.py``): host blocks read by this iteration's swap-ins
and cache loads stay referenced (``hold``) until the iteration's copies ran
(``release_holds``, from ``update_from_output``), so a ``cache_out`` of the same
iteration never writes them; every other overlap is ordered by the runner.

With ``swap_int8`` the host tier is lossy: nothing is named there, and a request whose
K/V came back through it names nothing until a recompute rebuilds them exactly.
"""

from __future__ import annotations

from tandem.kvcache import BlockHasher, KVCacheManager, KVExport, PrefixCacheStats
from tandem.request import Request, RequestStatus
from tandem.sched.offload import SwapStats
from tandem.sched.output import BlockCopy, SchedulerOutput


class PrefixCache:
    def __init__(
        self,
        enabled: bool,
        block_size: int,
        salt: str,
        device: KVCacheManager,
        host: KVCacheManager | None,
        int8_host: bool,
        swap: SwapStats,
    ) -> None:
        self.enabled = enabled
        self.block_size = block_size
        self.hasher = BlockHasher(block_size, salt)
        self.device, self.host = device, host
        self.hierarchical = enabled and host is not None and not int8_host
        self.int8_host = int8_host
        self.swap = swap
        self.stats = PrefixCacheStats()
        self._uncacheable: set[str] = set()
        self._out: SchedulerOutput | None = None
        # Takes of requests not admitted yet: the load's copy and the pin holding its source.
        self._loads: dict[str, tuple[BlockCopy, int]] = {}
        self._wb_src: list[int] = []  # this iteration's write-backs, device -> host
        self._wb_dst: list[int] = []
        self._held_exports: list[KVExport] = []
        self._held_pins: list[int] = []
        if self.hierarchical:
            device.on_evict = self._write_back

    # ---- one iteration -----------------------------------------------------------------

    def begin(self, out: SchedulerOutput) -> None:
        self.release_holds()
        self._out = out

    def end(self) -> None:
        assert not self._loads, f"prefix takes neither admitted nor dropped: {list(self._loads)}"
        if self._wb_src and self._out is not None:
            self._out.cache_out.append(
                BlockCopy("device", tuple(self._wb_src), tuple(self._wb_dst))
            )
            self.swap.cache_out_blocks += len(self._wb_src)
        self._wb_src, self._wb_dst = [], []
        self._out = None

    def hold(self, export: KVExport) -> None:
        """Release a host export (a swap-in's source) only after this iteration's copies."""
        self._held_exports.append(export)

    def release_holds(self) -> None:
        host = self.host
        if host is None:
            return
        for exp in self._held_exports:
            host.release_export(exp)
        for pin in self._held_pins:
            host.unpin(pin)
        self._held_exports.clear()
        self._held_pins.clear()

    # ---- lookup ------------------------------------------------------------------------

    def names(self, req: Request, num_tokens: int) -> list[bytes]:
        """The request's block names, extended to its full blocks within ``num_tokens``."""
        names = req.block_hashes
        full = min(num_tokens, _known(req)) // self.block_size
        if full > len(names):
            bs = self.block_size
            self.hasher.append(names, req.token_slice(len(names) * bs, full * bs))
        return names

    def _lookup(self, req: Request, loadable: bool) -> tuple[list[int], list[int]]:
        """(device blocks, host blocks after them) holding the request's longest cached
        prefix, stopping one token short of its known tokens. ``loadable``: the host run is
        cut to what free device blocks could receive now (``take``). Takes nothing."""
        bs = self.block_size
        known = _known(req)
        names = self.names(req, known)
        limit = (known - 1) // bs
        hit = self.device.match_prefix(names, limit)
        found: list[int] = []
        if self.hierarchical and len(hit) < limit:
            assert self.host is not None
            cap = limit - len(hit)
            if loadable:
                cap = min(cap, self.device.num_free_blocks - self.device.num_reviving(hit))
            found = self.host.match_prefix(names[len(hit) :], cap)
        return hit, found

    def peek(self, req: Request) -> int:
        """Prompt tokens a ``take`` now would start the request with (device and host
        hits, the same limit), changing nothing: no reference, no LRU touch. 0 with
        caching off. O(blocks matched) after the request's names are computed once."""
        if not self.enabled:
            return 0
        hit, found = self._lookup(req, loadable=False)
        return (len(hit) + len(found)) * self.block_size

    def take(self, req: Request) -> bool:
        """Start a waiting request's table with its cached prefix (see module doc).
        False, taking nothing, on a miss or with caching off."""
        if not self.enabled:
            return False
        rid, bs = req.request_id, self.block_size
        hit, found = self._lookup(req, loadable=True)
        if not hit and not found:
            return False  # the common miss: nothing taken, nothing to undo
        self.device.adopt_prefix(rid, hit)
        if found:
            assert self.host is not None
            # Pinned first: the device allocation below may evict, and a write-back of
            # that eviction may evict host blocks, but never pinned ones.
            pin = self.host.pin(found)
            dst = self.device.allocate(rid, (len(hit) + len(found)) * bs)
            self._loads[rid] = (BlockCopy("host", tuple(found), tuple(dst)), pin)
        req.num_computed_tokens = (len(hit) + len(found)) * bs
        return True

    def drop(self, req: Request) -> None:
        """Undo ``take`` for a request not admitted now (its blocks stay cached)."""
        load = self._loads.pop(req.request_id, None)
        if load is not None:
            assert self.host is not None
            self.host.unpin(load[1])
        self.device.free(req.request_id)
        req.num_computed_tokens = 0

    def admitted(self, req: Request, out: SchedulerOutput) -> None:
        """The request runs from this iteration on: emit its cache loads, count its hit."""
        load = self._loads.pop(req.request_id, None)
        host_tokens = 0
        if load is not None:
            copy, pin = load
            out.cache_in.append(copy)
            self._held_pins.append(pin)
            self.swap.cache_in_blocks += len(copy.src)
            host_tokens = len(copy.src) * self.block_size
        hit = req.num_computed_tokens
        if req.status is RequestStatus.WAITING:  # first admission
            req.num_cached_tokens = hit
            self.stats.record(req.num_prompt_tokens, hit, host_tokens)
        else:
            self.stats.resume_hit_tokens += hit

    # ---- naming ------------------------------------------------------------------------

    def computed(self, req: Request) -> None:
        """Name the request's newly computed full device blocks."""
        if not self.enabled or req.request_id in self._uncacheable:
            return
        # With async scheduling K/V may be computed for a sampled token whose id is not
        # read back yet: only blocks of known tokens are named.
        n = min(req.num_computed_tokens, _known(req))
        names = req.block_hashes
        if n // self.block_size > len(names):
            self.names(req, n)
        self.device.cache_blocks(req.request_id, names, n)

    def swapped_out(self, req: Request) -> None:
        """Name a swapped-out request's host blocks (their bytes land before any read)."""
        if self.hierarchical and req.request_id not in self._uncacheable:
            assert self.host is not None
            n = req.num_computed_tokens
            self.host.cache_blocks(req.request_id, self.names(req, n), n)

    def swapped_in(self, req: Request) -> None:
        if self.int8_host:
            self._uncacheable.add(req.request_id)

    def recomputes(self, request_id: str) -> None:
        self._uncacheable.discard(request_id)  # its K/V will be computed exactly again

    def forget(self, request_id: str) -> None:
        self._uncacheable.discard(request_id)

    def _write_back(self, block_id: int, name: bytes) -> None:
        """Device pool hook: a named block is being evicted (see module doc)."""
        host = self.host
        if self._out is None or host is None or host.pool.lookup(name) is not None:
            return
        if host.pool.num_free == 0:
            return  # every host block is in use (swapped requests, held copies)
        (h,) = host.pool.allocate(1)
        host.pool.cache(h, name)
        host.pool.free([h])  # evictable at once; the copy lands before any later read
        self._wb_src.append(block_id)
        self._wb_dst.append(h)

    # ---- figures -----------------------------------------------------------------------

    def stats_dict(self) -> dict[str, int | float]:
        p, dev, host = self.stats, self.device, self.host
        return {
            "prefix_caching": int(self.enabled),
            "prefix_cache_queries": p.queries,
            "prefix_cache_hits": p.hits,
            "prefix_cache_query_tokens": p.query_tokens,
            "prefix_cache_hit_tokens": p.hit_tokens,
            "prefix_cache_host_hit_tokens": p.host_hit_tokens,
            "prefix_cache_resume_hit_tokens": p.resume_hit_tokens,
            "prefix_cache_hit_rate": round(p.token_hit_rate, 6),
            "prefix_cache_request_hit_rate": round(p.request_hit_rate, 6),
            "kv_cached_blocks": dev.num_cached_blocks,
            "kv_evictable_blocks": dev.pool.num_evictable,
            "kv_cache_evictions": dev.num_evictions,
            "host_kv_cached_blocks": 0 if host is None else host.num_cached_blocks,
            "host_kv_cache_evictions": 0 if host is None else host.num_evictions,
            "host_cache_write_blocks": self.swap.cache_out_blocks,
            "host_cache_load_blocks": self.swap.cache_in_blocks,
        }


def _known(req: Request) -> int:
    """Tokens whose ids are known: a pending sampled token (async scheduling) is not."""
    return req.num_prompt_tokens + req.num_output_tokens
