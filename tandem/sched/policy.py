"""Scheduling policies: which request runs first (pure).

A policy orders requests; the batch builder (scheduler.py) packs them into an
iteration under the token budget, the batch size and free KV blocks, in that order. The
same policy objects order the router's admission queue and each worker's iterations.

Contract:
- ``on_arrival(request, now)``: a request enters (policies may assign a queue).
- ``before_schedule(requests, now)``: called once per iteration with every live request,
  before sorting (starvation promotion happens here).
- ``sort_key(request, now)``: smaller runs first. The API's ``priority`` class is the
  first element, so classes order strictly above any policy order. Must be cheap and
  free of side effects.
- ``on_service(request, num_tokens, seconds, now)``: the request was in the iteration
  that just ran, which took ``seconds``; ``num_tokens`` of it were this request's.
- ``on_finish(request)``: the request left; drop any state about it.

The request that sorts *last* among resident ones is the first to be preempted.
``POLICIES`` maps names to implementations; ``make_policy(name, ...)`` builds one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any

from tandem.request import Request


class SchedulingPolicy(abc.ABC):
    name: str = "abstract"

    def on_arrival(self, request: Request, now: float) -> None:  # noqa: B027 (optional hook)
        pass

    def before_schedule(self, requests: Iterable[Request], now: float) -> None:  # noqa: B027
        pass

    @abc.abstractmethod
    def sort_key(self, request: Request, now: float) -> tuple: ...

    def on_service(self, request: Request, num_tokens: int, seconds: float, now: float) -> None:  # noqa: B027
        pass

    def on_finish(self, request: Request) -> None:  # noqa: B027
        pass

    def describe(self, request: Request) -> dict[str, Any]:
        """Policy state of one request, for metrics and migration (JSON-able)."""
        return {}

    def restore(self, request: Request, state: dict[str, Any], now: float) -> None:  # noqa: B027
        """Adopt ``describe()`` output from another instance (after ``on_arrival``)."""


def _fcfs() -> SchedulingPolicy:
    from tandem.sched.fcfs import FCFSPolicy

    return FCFSPolicy()


def _mlfq(**kw: Any) -> SchedulingPolicy:
    from tandem.sched.mlfq import MLFQPolicy

    return MLFQPolicy(**kw)


def _alise(**kw: Any) -> SchedulingPolicy:
    from tandem.sched.alise import ALISEPolicy

    return ALISEPolicy(**kw)


POLICIES: dict[str, Callable[..., SchedulingPolicy]] = {
    "fcfs": _fcfs,
    "mlfq": _mlfq,
    "alise": _alise,
}


def make_policy(name: str, **options: Any) -> SchedulingPolicy:
    """Build policy ``name``. Options a policy does not take are ignored (FCFS takes none)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; available: {', '.join(sorted(POLICIES))}"
        ) from None
    return factory() if name == "fcfs" else factory(**options)
