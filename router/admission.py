"""The router's admission queue: skip-join MLFQ over requests not yet admitted (pure asyncio).

DESIGN step 2. A request joins the highest-priority queue whose quantum covers its
estimated prefill time (``MLFQPolicy.join_level``, from the cost model), skipping the
queues above; the router admits in order (priority class, queue, arrival) whenever a
worker has a free slot (its in-flight requests below its batch size, ``max_num_seqs`` in
its hello). So when every worker is full, a short prompt that arrives behind a burst of
long ones is admitted first, across all workers, instead of waiting in some worker's
FIFO. Once admitted, the worker's own MLFQ schedules it per token.

A waiter that is cancelled (client gone) leaves the queue; nothing else holds a slot
for it. ``lengths()`` reports queue length per level for /metrics.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from tandem.sched.cost_model import CostModel
from tandem.sched.mlfq import MLFQPolicy

DISPATCH = ("prefix", "usage", "round-robin")


class AdmissionQueue:
    def __init__(
        self,
        workers: Callable[[], Sequence[Any]],
        cost_model: CostModel | None = None,
        num_levels: int = 8,
        dispatch: str = "usage",
    ) -> None:
        """``workers()`` returns the current worker clients; each has ``connected``,
        ``in_flight`` and ``hello`` (with ``max_num_seqs``). ``dispatch``: ``usage`` picks
        the lowest virtual usage; ``prefix`` the lowest usage less the request's
        ``affinity(worker)`` (a bonus for the cached prefix it holds:
        ``router.prefix_affinity``); ``round-robin`` takes workers in turn (a
        deterministic spread, for benchmarks that need a known skew)."""
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
        self._workers = workers
        self.dispatch = dispatch
        self._turn = 0
        self.mlfq = MLFQPolicy(cost_model or CostModel(), num_levels=num_levels)
        self._heap: list[tuple[int, int, int, asyncio.Future]] = []
        self._seq = itertools.count()
        self._levels: dict[int, int] = {}
        # Slots granted to waiters that have not submitted yet (worker id -> count), so two
        # wake() calls in a row cannot hand out the same slot.
        self._granted: dict[int, int] = {}

    def __len__(self) -> int:
        return sum(self._levels.values())

    def lengths(self) -> dict[int, int]:
        return {level: self._levels.get(level, 0) for level in range(self.mlfq.num_levels)}

    def _free_worker(self, exclude: Any = None, affinity: Any = None) -> Any | None:
        """The worker with a free slot and the lowest virtual usage (Llumnix): KV blocks in
        use over its capacity (from its stats) plus its share of occupied batch slots (the
        requests it holds or was granted, whose KV demand is still growing)."""
        best, best_usage = None, 0.0
        free = []
        for w in self._workers():
            if not w.connected or w is exclude:
                continue
            hello = w.hello or {}
            limit = hello.get("max_num_seqs") or 256
            used = w.in_flight + self._granted.get(id(w), 0)
            if used >= limit:
                continue
            free.append(w)
            kv_total = max(int(hello.get("kv_blocks") or 1), 1)
            usage = w.stats.get("kv_used", 0) / kv_total + used / limit
            if affinity is not None and self.dispatch == "prefix":
                usage -= affinity(w)
            if best is None or usage < best_usage:
                best, best_usage = w, usage
        if self.dispatch == "round-robin" and free:
            self._turn += 1
            return free[self._turn % len(free)]
        return best

    def try_admit(self, exclude: Any = None, affinity: Any = None) -> Any | None:
        """A worker at once if nobody is queued and one has a free slot, else None.

        Synchronous on purpose: a caller that submits before its next ``await`` makes the
        slot visible (``in_flight``) to the next request's choice. Awaiting ``admit`` for
        a burst instead let every request of the burst read the same ``in_flight`` and pick
        the same worker (49 of 50 on one worker)."""
        if self._heap:
            return None
        return self._free_worker(exclude, affinity)

    async def admit(
        self, num_prompt_tokens: int, priority: int = 0, exclude: Any = None, affinity: Any = None
    ) -> tuple[Any, bool]:
        """Wait for this request's turn and a free worker slot.

        Returns (worker, granted). The caller must submit to the worker at once, then call
        ``submitted(worker, granted)``, and ``wake()`` when the request finishes.
        """
        level = self.mlfq.join_level(num_prompt_tokens)
        if not self._heap:
            worker = self._free_worker(exclude, affinity)
            if worker is not None:
                return worker, False
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (priority, level, next(self._seq), fut))
        self._levels[level] = self._levels.get(level, 0) + 1
        fut.add_done_callback(
            lambda _f, lv=level: self._levels.__setitem__(lv, self._levels[lv] - 1)
        )
        fut.exclude = exclude  # type: ignore[attr-defined]
        fut.affinity = affinity  # type: ignore[attr-defined]
        self.wake()
        try:
            return await fut, True
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled: give it back
                self.submitted(fut.result(), True)
                self.wake()
            raise

    def wake(self) -> None:
        """Hand free slots to the head of the queue (call when a request finishes)."""
        while self._heap:
            fut = self._heap[0][3]
            if fut.done():  # cancelled while waiting
                heapq.heappop(self._heap)
                continue
            worker = self._free_worker(
                getattr(fut, "exclude", None), getattr(fut, "affinity", None)
            )
            if worker is None:
                return
            heapq.heappop(self._heap)
            self._granted[id(worker)] = self._granted.get(id(worker), 0) + 1
            fut.granted = True  # type: ignore[attr-defined]
            fut.set_result(worker)

    def submitted(self, worker: Any, fut_granted: bool) -> None:
        """The caller submitted to ``worker``: its granted slot is now an in-flight request."""
        if fut_granted and self._granted.get(id(worker), 0) > 0:
            self._granted[id(worker)] -= 1
