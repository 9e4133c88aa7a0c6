"""What the scheduler hands the runner, and what the runner hands back (pure).

One iteration: ``SchedulerOutput`` → runner → ``RunnerOutput`` →
``Scheduler.update_from_output``. The runner must apply, in this order:
``swap_out`` copies, then ``swap_in`` copies, then the forward pass. The scheduler relies
on that order: device blocks given up by a swap-out may be handed to another request in
the same iteration, whose forward pass overwrites them only after the copy.

``offload`` and ``prefetch`` are copies ahead of need (FastServe): the forward pass of this
iteration reads and writes none of their blocks, so they may overlap it, but they must
be complete before the next iteration's forward pass (which may reuse the device blocks
an offload gave up, or run the request a prefetch brought in) and before any other read
of those blocks. Copies between the same two blocks keep the order they were issued in,
across iterations. Within one iteration, ``swap_out`` + ``offload`` and ``swap_in`` +
``prefetch`` are never both non-empty (no ping-pong).

The hierarchical prefix cache adds two lists of copies needed now. The full order is::

    cache_out, swap_out, swap_in, cache_in, forward pass   (offload, prefetch: ahead)

``cache_out`` writes cached device blocks being evicted in this iteration to the host
tier's cache (before anything reuses them); ``cache_in`` loads cached host blocks into a
new request's device blocks (after every host write of the iteration, so a host block
named in this iteration is read with its bytes in place). They may share an iteration
with any other copy: the host blocks a swap-in or a cache load reads stay referenced
until ``update_from_output``, so no copy of the same iteration writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.request import Request


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute ``token_ids`` at positions ``start_pos ..``; sample if ``sample``."""

    request: Request
    token_ids: list[int]
    start_pos: int  # == request.num_computed_tokens when scheduled
    block_table: list[int]  # device blocks covering start_pos + len(token_ids) tokens
    sample: bool  # this chunk completes the request's tokens: produce the next one
    # Renewed whenever the request's device table changes (KVCacheManager.table_stamp);
    # None = unknown, so a consumer must not reuse a cached copy of the table.
    table_stamp: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class BlockCopy:
    """Copy K/V of ``src`` blocks (in ``src_tier``) to ``dst`` blocks, pairwise."""

    src_tier: str  # "device" or "host"
    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    swap_out: list[BlockCopy] = field(default_factory=list)  # device -> host
    swap_in: list[BlockCopy] = field(default_factory=list)  # host -> device
    offload: list[BlockCopy] = field(default_factory=list)  # device -> host, ahead of need
    prefetch: list[BlockCopy] = field(default_factory=list)  # host -> device, ahead of need
    cache_out: list[BlockCopy] = field(default_factory=list)  # evicted cached blocks -> host
    cache_in: list[BlockCopy] = field(default_factory=list)  # host cache hits -> device
    preempted: list[str] = field(default_factory=list)
    launched: bool = False  # Scheduler.on_launched has advanced its requests

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def swaps_out(self) -> bool:
        return bool(self.swap_out or self.offload)

    @property
    def swaps_in(self) -> bool:
        return bool(self.swap_in or self.prefetch)

    @property
    def copies_cache(self) -> bool:
        return bool(self.cache_out or self.cache_in)

    @property
    def is_empty(self) -> bool:
        return (
            not self.chunks and not self.swaps_out and not self.swaps_in and not self.copies_cache
        )


@dataclass(frozen=True)
class SwapIO:
    """What the runner's swap copies cost in one iteration (bytes on the host side)."""

    out_bytes: int = 0
    in_bytes: int = 0
    in_wait_s: float = 0.0  # the loop blocked this long waiting for swap-ins to land
    out_wait_s: float = 0.0
    copy_s: float = 0.0  # duration of the copies completed (device time on CUDA)
    cache_out_bytes: int = 0  # of out_bytes, written by cache_out copies
    cache_in_bytes: int = 0  # of in_bytes, read by cache_in copies


@dataclass
class RunnerOutput:
    """Sampled token (and optional logprobs) per request whose chunk had ``sample``."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    swap: SwapIO = field(default_factory=SwapIO)
