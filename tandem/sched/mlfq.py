"""Skip-join multi-level feedback queue (FastServe, arXiv 2305.05920).

Queue i has quantum ``q0 · 2^i`` seconds of service. Rules:

- **Skip-join.** A new request joins the highest-priority queue whose quantum is at least
  its estimated prefill time (cost model, for its input length less the prefix the cache
  already holds of it), skipping the queues above it. With ``skip_join=False`` every
  request joins queue 0 (classic MLFQ).
- **Order inside a queue** (``order``):
  - ``"arrival"`` (default): FCFS by arrival inside a queue; the queue is given by the
    service the request attained. A request keeps its arrival rank when it is demoted,
    so in a burst the oldest requests of a level run first and finish, instead of every
    request of the level taking turns (least-attained-service with FIFO re-entry behaves
    like processor sharing in a burst: everyone finishes late; issue 15).
  - ``"fastserve"``: FIFO by the order the request *entered* the queue, a demoted request
    at the front of its new queue (FastServe's rule; the behaviour before issue 15).
- **Demotion.** A request whose service in its current queue reaches that queue's quantum
  moves down one queue.
- **Starvation (bounded wait).** A request not served for ``starvation_limit`` seconds is
  promoted to queue 0, its service counter reset; with ``order="arrival"`` it ranks there
  by arrival, so it is behind only older requests of queue 0 and runs within a bounded
  time. Promotion never crosses a priority class.

Quanta come from the cost model: ``q0`` (when not given) is four decode steps at batch 1,
512-token context; queue i's quantum is ``q0 · 2^i``.

Demotion is the only downward move and starvation promotion the only upward one.
``sort_key = (priority class, queue, rank)``; the ``priority`` class is strict: no state
of a request of a worse class ranks it ahead of a request of a better class.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tandem.request import Request
from tandem.sched.cost_model import CostModel
from tandem.sched.policy import SchedulingPolicy

ORDERS = ("arrival", "fastserve")


@dataclass
class _MLFQState:
    level: int
    position: int  # FIFO order inside the level; negative = inserted at the front
    service: float = 0.0  # seconds of service received in the current level
    last_served: float = 0.0
    arrival_rank: int = 0  # FCFS rank (order="arrival")


class MLFQPolicy(SchedulingPolicy):
    name = "mlfq"

    def __init__(
        self,
        cost_model: CostModel | None = None,
        q0: float | None = None,
        num_levels: int = 8,
        starvation_limit: float = 60.0,
        skip_join: bool = True,
        order: str = "arrival",
        **_: object,
    ) -> None:
        self.cost = cost_model or CostModel()
        # Default q0: about four decode steps at batch 1 (512-token context) — short answers
        # finish in queue 0 or 1, long ones sink after a few quanta. Floored at 1 ms so a
        # noisy profile (coefficients clipped to 0) cannot make it degenerate.
        self.q0 = q0 if q0 is not None else max(4 * self.cost.decode_time(1, 512), 1e-3)
        if self.q0 <= 0 or num_levels < 1 or starvation_limit <= 0:
            raise ValueError("mlfq needs q0 > 0, num_levels >= 1 and starvation_limit > 0")
        if order not in ORDERS:
            raise ValueError(f"mlfq order must be one of {ORDERS}, got {order!r}")
        self.order = order
        self.num_levels = num_levels
        self.starvation_limit = starvation_limit
        self.skip_join = skip_join
        self._state: dict[str, _MLFQState] = {}
        self._back = itertools.count(1)
        self._front = itertools.count(-1, -1)
        # Counters for metrics and tests.
        self.demotions = 0
        self.promotions = 0

    def quantum(self, level: int) -> float:
        return self.q0 * (2**level)

    def join_level(self, num_prompt_tokens: int) -> int:
        if not self.skip_join:
            return 0
        estimate = self.cost.prefill_time(num_prompt_tokens)
        for level in range(self.num_levels):
            if self.quantum(level) >= estimate:
                return level
        return self.num_levels - 1

    def level_of(self, request_id: str) -> int | None:
        state = self._state.get(request_id)
        return None if state is None else state.level

    def on_arrival(self, request: Request, now: float) -> None:
        if request.request_id in self._state:
            return
        # Skip-join on the prefill it needs: a cached prefix is not recomputed.
        level = self.join_level(max(request.num_prompt_tokens - request.num_cached_tokens, 1))
        rank = next(self._back)
        self._state[request.request_id] = _MLFQState(level, rank, 0.0, now, rank)

    def before_schedule(self, requests: Iterable[Request], now: float) -> None:
        for req in requests:
            st = self._state.get(req.request_id)
            if st is not None and st.level > 0 and now - st.last_served > self.starvation_limit:
                st.level, st.position, st.service, st.last_served = 0, next(self._back), 0.0, now
                self.promotions += 1

    def sort_key(self, request: Request, now: float) -> tuple:
        st = self._state.get(request.request_id)
        if st is None:
            return (request.priority, self.num_levels, 0)
        if self.order == "arrival":
            return (request.priority, st.level, st.arrival_rank)
        return (request.priority, st.level, st.position)

    def on_service(self, request: Request, num_tokens: int, seconds: float, now: float) -> None:
        st = self._state.get(request.request_id)
        if st is None:
            return
        st.service += seconds
        st.last_served = now
        if st.service >= self.quantum(st.level) and st.level < self.num_levels - 1:
            st.level += 1
            st.service = 0.0
            st.position = next(self._front)
            self.demotions += 1

    def on_finish(self, request: Request) -> None:
        self._state.pop(request.request_id, None)

    def describe(self, request: Request) -> dict[str, Any]:
        st = self._state.get(request.request_id)
        return {} if st is None else {"level": st.level, "service": st.service}

    def restore(self, request: Request, state: dict[str, Any], now: float) -> None:
        st = self._state.get(request.request_id)
        if st is not None and "level" in state:
            st.level = min(max(int(state["level"]), 0), self.num_levels - 1)
            st.service = float(state.get("service", 0.0))
