"""Scheduling policies: which request runs first (pure).

A policy orders requests; the batch builder (scheduler.py) packs them into an
iteration under the token budget, the batch size and free KV blocks. The contract:

- ``on_arrival(request, now)``: a new request enters (policies may assign a level).
- ``sort_key(request, now)``: smaller runs first. The API's ``priority`` class must be the
  first element, so classes order strictly above any policy order.
- ``on_service(request, num_tokens, now)``: the request was in the iteration that just ran.
- ``on_finish(request)``: the request left; drop any state about it.

The request that sorts *last* among running ones is the first to be preempted.
``POLICIES`` maps names to implementations; ``make_policy(name)`` builds one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from tandem.request import Request


class SchedulingPolicy(abc.ABC):
    name: str = "abstract"

    def on_arrival(self, request: Request, now: float) -> None:  # noqa: B027 (optional hook)
        pass

    @abc.abstractmethod
    def sort_key(self, request: Request, now: float) -> tuple: ...

    def on_service(self, request: Request, num_tokens: int, now: float) -> None:  # noqa: B027
        pass

    def on_finish(self, request: Request) -> None:  # noqa: B027
        pass


class FCFSPolicy(SchedulingPolicy):
    """First come, first served (vLLM / Orca): arrival order inside a priority class."""

    name = "fcfs"

    def __init__(self) -> None:
        self._seq: dict[str, int] = {}
        self._counter = 0

    def on_arrival(self, request: Request, now: float) -> None:
        if request.request_id not in self._seq:
            self._seq[request.request_id] = self._counter
            self._counter += 1

    def sort_key(self, request: Request, now: float) -> tuple:
        # The counter breaks ties between equal arrival times deterministically.
        return (request.priority, request.arrival_time, self._seq.get(request.request_id, 0))

    def on_finish(self, request: Request) -> None:
        self._seq.pop(request.request_id, None)


POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {"fcfs": FCFSPolicy}


def make_policy(name: str) -> SchedulingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(sorted(POLICIES))}") from None
