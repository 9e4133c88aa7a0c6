"""First come, first served (vLLM / Orca baseline): arrival order inside a priority class.

Requests are never reordered once admitted, so a long request at the head holds its batch
slot until it finishes: this is the head-of-line blocking that mlfq and alise remove.
"""

from __future__ import annotations

from tandem.request import Request
from tandem.sched.policy import SchedulingPolicy


class FCFSPolicy(SchedulingPolicy):
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
