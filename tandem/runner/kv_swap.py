"""Moving KV blocks between the device tier and the host tier for one iteration.

``KVSwapper.run(sched)`` is called by the runner before each forward pass. Contract
(see ``tandem/sched/output.py``): ``swap_out`` and ``swap_in`` copies are complete when
``run`` returns (the forward pass may reuse or read their blocks); ``offload`` and
``prefetch`` copies may still be in flight, and are complete before the next ``run``
returns and before ``wait_all`` returns.

On CPU every copy is synchronous, so its whole duration is time the decode loop waits.

On CUDA every copy runs on one side stream, in issue order, so two copies that touch the
same block (a prefetch whose host blocks a later offload reuses) never reorder. Before
issuing, the side stream waits for the compute stream (the K/V a swap-out reads were
written by earlier forward passes). Copies ahead of need only record an event; the next
``run`` blocks on it only if it has not fired yet, and that blocking is the time counted
as waiting: the part of the copy the forward pass did not hide. Copies needed now are
waited for at once (they are on the critical path by definition).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tandem.runner.host_kv import HostKVTier
from tandem.runner.kv_tensors import KVTensors
from tandem.sched.output import BlockCopy, SchedulerOutput, SwapIO


@dataclass
class _InFlight:
    """Copies issued on the side stream, not yet known to be complete (CUDA only)."""

    direction: str  # "out" or "in"
    start: torch.cuda.Event
    end: torch.cuda.Event


@dataclass
class _Tally:
    out_bytes: int = 0
    in_bytes: int = 0
    in_wait_s: float = 0.0
    out_wait_s: float = 0.0
    copy_s: float = 0.0
    cache_out_bytes: int = 0
    cache_in_bytes: int = 0

    def wait(self, direction: str, seconds: float) -> None:
        if direction == "in":
            self.in_wait_s += seconds
        else:
            self.out_wait_s += seconds

    def freeze(self) -> SwapIO:
        return SwapIO(
            self.out_bytes, self.in_bytes, self.in_wait_s, self.out_wait_s, self.copy_s,
            self.cache_out_bytes, self.cache_in_bytes,
        )  # fmt: skip


class KVSwapper:
    def __init__(self, device_kv: KVTensors, host: HostKVTier) -> None:
        self.device_kv = device_kv
        self.host = host
        self.device = device_kv.device
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._in_flight: list[_InFlight] = []
        self._carry = _Tally()  # waits in wait_all, reported with the next run

    def run(self, sched: SchedulerOutput) -> SwapIO:
        tally, self._carry = self._carry, _Tally()
        self._drain(tally)  # last iteration's offloads/prefetches land before this forward
        # The order of sched/output.py: prefix-cache write-backs first, cache loads last.
        tally.cache_out_bytes += (
            sum(len(c.src) for c in sched.cache_out) * self.host.bytes_per_block
        )
        tally.cache_in_bytes += sum(len(c.src) for c in sched.cache_in) * self.host.bytes_per_block
        for copies, direction, ahead in (
            (sched.cache_out, "out", False),
            (sched.swap_out, "out", False),
            (sched.swap_in, "in", False),
            (sched.cache_in, "in", False),
            (sched.offload, "out", True),
            (sched.prefetch, "in", True),
        ):
            if copies:
                self._issue(copies, direction, ahead, tally)
        return tally.freeze()

    def wait_all(self) -> None:
        """Block until every copy issued so far is complete (before reading or writing
        device blocks outside ``run``: export, import). Its cost is in the next ``run``."""
        self._drain(self._carry)

    # ------------------------------------------------------------------ internals
    def _issue(self, copies: list[BlockCopy], direction: str, ahead: bool, tally: _Tally) -> None:
        nbytes = sum(len(c.src) for c in copies) * self.host.bytes_per_block
        if direction == "out":
            tally.out_bytes += nbytes
        else:
            tally.in_bytes += nbytes
        if not self._cuda:
            t0 = time.perf_counter()
            self._copy(copies, direction)
            dt = time.perf_counter() - t0
            tally.copy_s += dt
            tally.wait(direction, dt)
            return
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self._copy(copies, direction)
            end.record()
        job = _InFlight(direction, start, end)
        if ahead:
            self._in_flight.append(job)
        else:
            self._finish(job, tally)

    def _copy(self, copies: list[BlockCopy], direction: str) -> None:
        """The copies on the current stream. Payloads are block-major [n, L, 2, bs, H, D]."""
        data = self.device_kv.data  # [L, 2, N, bs, H, D]
        for c in copies:
            if len(c.src) != len(c.dst):
                raise ValueError(f"copy of {len(c.src)} blocks into {len(c.dst)}")
            if not c.src:
                continue
            if direction == "out":
                idx = torch.as_tensor(c.src, dtype=torch.long, device=self.device)
                payload = data.index_select(2, idx).movedim(2, 0).contiguous()
                self.host.store(c.dst, payload)
            else:
                payload = self.host.load(c.src, self.device)
                idx = torch.as_tensor(c.dst, dtype=torch.long, device=self.device)
                data.index_copy_(2, idx, payload.movedim(0, 2))

    def _drain(self, tally: _Tally) -> None:
        jobs, self._in_flight = self._in_flight, []
        for job in jobs:
            self._finish(job, tally)

    @staticmethod
    def _finish(job: _InFlight, tally: _Tally) -> None:
        if not job.end.query():
            t0 = time.perf_counter()
            job.end.synchronize()
            tally.wait(job.direction, time.perf_counter() - t0)
        tally.copy_s += job.start.elapsed_time(job.end) / 1000.0
