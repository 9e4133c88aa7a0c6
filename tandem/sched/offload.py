"""Proactive KV offload to the host tier and prefetch back (FastServe): decisions only (pure).

After the scheduler has built an iteration's batch it asks the ``OffloadPlanner`` which
idle requests to swap out ahead of need, or which swapped requests to swap in ahead of
their turn. It applies the answer with the same export/import moves as swap preemption;
the runner copies the bytes (on a side stream on CUDA, overlapping the forward pass: see
``tandem/runner/kv_swap.py``). Neither kind of copy touches a block of the batch that the
scheduler just built, so the runner need not finish them before that batch runs.

Rules, with ``W = ceil(watermark · device blocks)``:

- **Offload** only while free device blocks ``< W``. Victims are resident requests that
  are not in this iteration's batch, taken from the lowest-priority end of the policy
  order: with mlfq the back of the lowest queue, with alise the largest estimated
  remaining time (everything ranked ahead of it runs first, so it is also the request
  with the longest estimated time until it runs again). It stops as soon as free ``>= W``.
  It skips a request that was swapped in fewer than ``hysteresis`` iterations ago, and one
  the host tier has no room for.
- **Prefetch** only into room above the watermark: a swapped request is swapped in only
  if free blocks stay ``>= W`` afterwards. Candidates are the swapped requests the
  scheduler runs next: those among the first ``max_num_seqs`` of the policy order, in
  that order. The first that does not fit ends prefetching (a smaller one behind it
  must not jump it forever).
- **No ping-pong**: the two bands do not overlap (offload below ``W``, prefetch never
  ends below ``W``), an iteration that swapped anything out prefetches nothing, one that
  swapped anything in offloads nothing, and hysteresis keeps a request just swapped in
  from being offloaded straight back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.sched.output import SwapIO


@dataclass(frozen=True)
class Candidate:
    """A request the planner may move: what moving it costs and frees, in blocks."""

    request_id: str
    device_blocks: int  # offload: device blocks it frees; prefetch: device blocks it needs
    host_blocks: int  # offload: host blocks it needs (prefetch ignores this)


@dataclass
class SwapStats:
    """Cumulative swap counters of one engine (for worker stats and /metrics).

    Blocks and requests are counted by the scheduler as it decides; bytes and seconds by
    the runner as it copies (they reach here through ``RunnerOutput.swap``).
    """

    out_blocks: int = 0  # device -> host, preemption and proactive
    in_blocks: int = 0  # host -> device, on demand and prefetch
    proactive_outs: int = 0  # requests offloaded under the watermark
    prefetches: int = 0  # requests swapped in ahead of their turn
    out_bytes: int = 0  # bytes written to the host tier (int8 + scales with swap_int8)
    in_bytes: int = 0  # bytes read from the host tier
    in_wait_s: float = 0.0  # the decode loop waited this long for swap-ins to land
    out_wait_s: float = 0.0  # ... and this long for swap-outs
    copy_s: float = 0.0  # time the copies themselves took (device time on CUDA)
    # Hierarchical prefix cache (not counted above, except in the byte totals):
    cache_out_blocks: int = 0  # cached device blocks written to the host cache on eviction
    cache_in_blocks: int = 0  # host cache hits loaded into device blocks
    cache_out_bytes: int = 0
    cache_in_bytes: int = 0

    def add_io(self, io: SwapIO) -> None:
        self.out_bytes += io.out_bytes
        self.in_bytes += io.in_bytes
        self.in_wait_s += io.in_wait_s
        self.out_wait_s += io.out_wait_s
        self.copy_s += io.copy_s
        self.cache_out_bytes += io.cache_out_bytes
        self.cache_in_bytes += io.cache_in_bytes


def watermark_blocks(fraction: float, num_blocks: int) -> int:
    """``ceil(fraction · num_blocks)``, robust to float error (0.05 · 100 is 5, not 6)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"watermark must be a fraction in [0, 1), got {fraction}")
    return math.ceil(round(fraction * num_blocks, 9))


class OffloadPlanner:
    """Watermark, victim and prefetch choice, and the hysteresis state behind them.

    ``iteration`` arguments are the scheduler's iteration counter (one per ``schedule()``).
    """

    def __init__(self, watermark: float, num_device_blocks: int, hysteresis: int) -> None:
        if hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0 iterations, got {hysteresis}")
        self.watermark = watermark_blocks(watermark, num_device_blocks)
        self.hysteresis = hysteresis
        self._swapped_in_at: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.watermark > 0

    def note_swap_in(self, request_id: str, iteration: int) -> None:
        self._swapped_in_at[request_id] = iteration

    def forget(self, request_id: str) -> None:
        self._swapped_in_at.pop(request_id, None)

    def protected(self, request_id: str, iteration: int) -> bool:
        """Whether the request came in too recently to be offloaded again."""
        at = self._swapped_in_at.get(request_id)
        return at is not None and iteration - at < self.hysteresis

    def plan_offload(
        self,
        tail_first: Sequence[Candidate],
        num_free: int,
        host_free: int,
        iteration: int,
    ) -> list[str]:
        """Request ids to swap out, in order, from ``tail_first`` (idle residents, lowest
        priority first) until ``num_free >= watermark``. ``[]`` when already above it."""
        victims: list[str] = []
        for cand in tail_first:
            if num_free >= self.watermark:
                break
            if cand.host_blocks > host_free or self.protected(cand.request_id, iteration):
                continue
            victims.append(cand.request_id)
            num_free += cand.device_blocks
            host_free -= cand.host_blocks
        return victims

    def plan_prefetch(self, in_order: Sequence[Candidate], num_free: int) -> list[str]:
        """Request ids to swap in, in order, from ``in_order`` (swapped requests of the
        next batch, highest priority first) while free blocks stay at or above the
        watermark; stops at the first that does not fit."""
        picked: list[str] = []
        for cand in in_order:
            if num_free - cand.device_blocks < self.watermark:
                break
            picked.append(cand.request_id)
            num_free -= cand.device_blocks
        return picked
