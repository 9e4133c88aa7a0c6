"""The rebalancer's decision: which request to move from which decode worker to which (pure).

Llumnix's virtual usage of a worker is the KV demand of every request it holds, running
or waiting, over its capacity: ``sum(blocks(prompt + tokens so far)) / kv_blocks``. The
router knows both without asking (every token passes through it), so the figure is
current, not a stale heartbeat.

``pick_migration`` pairs the most and the least used worker. If their gap is at least
``min_gap`` it moves the candidate (a request on the source that is decoding there and
has enough tokens left to be worth moving) whose move leaves the smallest gap, and only
if that gap is smaller than before: moving ``b`` blocks changes the gap by
``b / cap_src + b / cap_dst``, so a request too big for the gap is never moved (that
would only swap the roles and migrate back and forth). The destination must have room
for it. Ties go to the smaller request (cheaper to move).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    request_id: str
    blocks: int  # KV blocks it holds now


@dataclass(frozen=True)
class WorkerLoad:
    worker: str
    capacity: int  # KV blocks
    demand: int  # KV blocks of every request it holds
    candidates: tuple[Candidate, ...] = ()

    @property
    def usage(self) -> float:
        return self.demand / max(self.capacity, 1)

    @property
    def free(self) -> int:
        return self.capacity - self.demand


@dataclass(frozen=True)
class Decision:
    source: str
    dest: str
    request_id: str
    gap_before: float
    gap_after: float


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def pick_migration(loads: Sequence[WorkerLoad], min_gap: float) -> Decision | None:
    """The migration that narrows the gap between the most and least used workers most,
    or None (fewer than two workers, gap below ``min_gap``, or no candidate helps)."""
    if len(loads) < 2:
        return None
    src = max(loads, key=lambda w: (w.usage, w.worker))
    dst = min(loads, key=lambda w: (w.usage, w.worker))
    gap = src.usage - dst.usage
    if src is dst or gap < min_gap:
        return None
    best: tuple[float, int, Candidate] | None = None
    per_block = 1 / max(src.capacity, 1) + 1 / max(dst.capacity, 1)
    for c in src.candidates:
        if c.blocks <= 0 or c.blocks > dst.free:
            continue
        after = abs(gap - c.blocks * per_block)
        if after >= gap:
            continue
        key = (after, c.blocks, c)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:
        return None
    return Decision(src.worker, dst.worker, best[2].request_id, gap, best[0])
