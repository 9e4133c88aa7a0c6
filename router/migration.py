"""The router's side of live migration: who holds each request, moves, drain, rebalancer.

Every request in flight has a ``Flight``: its route, the decode worker that holds it and
how many tokens it has streamed (so the router knows each worker's KV demand without
asking). A move of one request from decode worker A to B:

1. ``start``: B is told to ``expect`` the request into the request's own token queue
   (``expect_migration``: if B is lost meanwhile the request is not, it still runs on
   A), B joins the route (an abort reaches it too), and A gets ``migrate``.
2. A runs the stages (``decode_worker/migration_out.py``) and answers on its socket.
   ``migrated`` comes after every token A sent for the request, and B's tokens carry
   their output offsets, so the stream's ``InOrder`` joins the two sockets with no token
   skipped or repeated whatever order they arrive in. A leaves the route; B holds it.
3. ``migrate_failed``: B leaves the route and withdraws its expectation (``unexpect``;
   ``abort`` if B may have committed, in which case A gave the request up with a
   worker-lost error and the stream re-runs it from its last token). The request goes
   on on A.

At most one move per request; the stream ending or re-running ends its move. The
rebalancer (``mode`` balanced) pairs workers every ``interval_s`` (``router.rebalance``);
``drain`` moves everything off one worker, at most ``max_concurrent`` at a time, and
keeps new requests away from it until ``undrain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from router.rebalance import Candidate, WorkerLoad, blocks_for, pick_migration
from router.workers import Route, WorkerClient, lost_item
from tandem.protocol import Migrate, Migrated, MigrateFailed

log = logging.getLogger("tandem.router")

MODES = ("off", "manual", "balanced")


class MigrationError(Exception):
    """A move that cannot start; ``status`` is the HTTP status an admin call answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MigrationConfig:
    mode: str = "off"  # off | manual (admin endpoints only) | balanced (+ the rebalancer)
    interval_s: float = 0.5
    min_gap: float = 0.1
    final_blocks: int = 2
    max_stages: int = 8
    max_concurrent: int = 4  # moves at once off a draining worker
    min_remaining: int = 16  # tokens a request must have left for the rebalancer to move it

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--migration must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.interval_s > 0:
            raise ValueError(f"--migration-interval must be > 0, got {self.interval_s}")
        if not 0 <= self.min_gap <= 1:
            raise ValueError(f"--migration-min-gap must be in [0, 1], got {self.min_gap}")
        if self.final_blocks < 0:
            raise ValueError(f"--migration-final-blocks must be >= 0, got {self.final_blocks}")
        if self.max_stages < 1:
            raise ValueError(f"--migration-max-stages must be >= 1, got {self.max_stages}")


@dataclass(eq=False)
class Flight:
    rid: str  # the id the client sees
    wire: str  # the id on the wire now (a re-run gets a fresh one)
    route: Route
    decode: WorkerClient | None  # the decode worker that holds it (None: colocated)
    prompt_len: int
    max_tokens: int
    n_out: int = 0
    move: Move | None = None
    retry_at: float = 0.0


@dataclass(eq=False)
class Move:
    flight: Flight
    src: WorkerClient
    dst: WorkerClient
    queue: asyncio.Queue
    reason: str
    started: float = field(default_factory=time.monotonic)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class DrainState:
    migrated: int = 0
    failed: int = 0
    done: bool = False


class Migrator:
    def __init__(self, config: MigrationConfig, workers, metrics, on_slot_free) -> None:
        """``workers()``: the router's worker clients; ``on_slot_free()``: a request left a
        worker (admission may go on)."""
        self.config = config
        self._workers = workers
        self.metrics = metrics
        self._on_slot_free = on_slot_free
        self.flights: dict[str, Flight] = {}
        self._moves: dict[str, Move] = {}  # wire id -> its move in progress
        self.drains: dict[str, DrainState] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ flights
    def track(self, rid: str, wire: str, route: Route, prompt_len: int, max_tokens: int) -> Flight:
        decode = route.clients[-1] if route.clients[-1].role == "decode" else None
        flight = Flight(rid, wire, route, decode, prompt_len, max_tokens)
        self.flights[rid] = flight
        return flight

    def retrack(self, flight: Flight, wire: str, route: Route) -> None:
        """The request re-runs as ``wire`` on ``route`` (its worker was lost)."""
        self._end_move(flight, "the request was re-run elsewhere")
        flight.wire, flight.route = wire, route
        flight.decode = route.clients[-1] if route.clients[-1].role == "decode" else None

    def untrack(self, rid: str) -> None:
        flight = self.flights.pop(rid, None)
        if flight is not None:
            self._end_move(flight, "the request ended")
        self._changed.set()

    def _end_move(self, flight: Flight, why: str) -> None:
        move = flight.move
        if move is None:
            return
        flight.move = None
        self._moves.pop(flight.wire, None)
        move.dst.release(flight.wire)
        flight.route.remove(move.dst)
        self._settle(move, {"outcome": "aborted", "error": why})

    # ------------------------------------------------------------------ moves
    def workers(self) -> list[WorkerClient]:
        """Connected decode workers that can send and receive migrations."""
        return [
            w
            for w in self._workers()
            if w.connected and w.role == "decode" and (w.hello or {}).get("migration")
        ]

    def find_worker(self, name: str) -> WorkerClient | None:
        for w in self._workers():
            if name in (w.address, (w.hello or {}).get("worker_id")):
                return w
        return None

    def start(
        self,
        flight: Flight,
        dst: WorkerClient,
        reason: str,
        fault: str | None = None,
        min_copy_stages: int = 0,
    ) -> Move:
        src = flight.decode
        if src is None:
            raise MigrationError(409, f"request {flight.rid} is not on a decode worker")
        if flight.move is not None:
            raise MigrationError(409, f"request {flight.rid} is already being migrated")
        if dst is src:
            raise MigrationError(400, f"request {flight.rid} already runs on {dst.address}")
        if dst not in self.workers():
            raise MigrationError(400, f"{dst.address} is not a connected decode worker")
        if dst.draining:
            raise MigrationError(409, f"{dst.address} is draining")
        queue = src.queue_of(flight.wire)
        if flight.n_out < 2 or queue is None:
            raise MigrationError(409, f"request {flight.rid} is not decoding on {src.address} yet")
        msg = Migrate(
            request_id=flight.wire,
            dest_kv=dst.hello["kv_address"],
            final_blocks=self.config.final_blocks,
            max_stages=self.config.max_stages,
            min_copy_stages=min_copy_stages,
            fault=fault,
        )
        try:
            dst.expect_migration(flight.wire, queue)
            src.send(msg)
        except ConnectionError as e:
            dst.release(flight.wire)
            raise MigrationError(503, f"worker unavailable: {e}") from None
        flight.route.add(dst)
        move = flight.move = self._moves[flight.wire] = Move(flight, src, dst, queue, reason)
        self.metrics.migrations["started"] += 1
        return move

    def on_reply(self, client: WorkerClient, msg: Migrated | MigrateFailed) -> None:
        """``Migrated`` / ``MigrateFailed`` from a source worker (its reader task)."""
        wire = str(msg.request_id)
        move = self._moves.get(wire)
        if move is None or client is not move.src:
            return  # the request ended or re-ran meanwhile: its move was settled then
        del self._moves[wire]
        flight = move.flight
        flight.move = None
        if isinstance(msg, Migrated):
            flight.route.remove(move.src)
            flight.decode = move.dst
            move.dst.migration_landed(wire)
            if not move.dst.connected:  # lost after it committed: the stream re-runs it
                move.queue.put_nowait(lost_item(wire, move.dst.address))
            self.metrics.observe_migration(msg)
            self._on_slot_free()
            result = {"outcome": "committed", "blocks": msg.blocks, "stages": msg.stages,
                      "seconds": msg.seconds, "downtime_s": msg.downtime_s}  # fmt: skip
        else:
            flight.route.remove(move.dst)
            if msg.maybe_committed:
                move.dst.abort(wire)
            else:
                move.dst.unexpect(wire)
            flight.retry_at = time.monotonic() + 1.0
            result = {"outcome": "aborted", "error": msg.error}
        self._settle(move, result)

    def _settle(self, move: Move, result: dict[str, Any]) -> None:
        if result["outcome"] != "committed":
            self.metrics.migrations["aborted"] += 1
        drain = self.drains.get(move.src.address) if move.reason == "drain" else None
        if drain is not None:
            drain.migrated += result["outcome"] == "committed"
            drain.failed += result["outcome"] != "committed"
        if not move.done.done():
            move.done.set_result({"request_id": move.flight.rid, "from": move.src.address,
                                  "to": move.dst.address, **result})  # fmt: skip
        self._changed.set()

    # ------------------------------------------------------------------ load
    def load(self, w: WorkerClient, now: float) -> WorkerLoad:
        bs = int((w.hello or {}).get("block_size") or 16)
        demand, candidates = 0, []
        for f in self.flights.values():
            blocks = blocks_for(f.prompt_len + f.n_out, bs)
            if f.decode is w:
                demand += blocks
                if (
                    f.move is None
                    and f.n_out >= 2
                    and f.max_tokens - f.n_out >= self.config.min_remaining
                    and now >= f.retry_at
                ):
                    candidates.append(Candidate(f.rid, blocks))
            elif f.move is not None and f.move.dst is w:
                demand += blocks  # on its way here
        capacity = int((w.hello or {}).get("kv_blocks") or 1)
        return WorkerLoad(w.address, capacity, demand, tuple(candidates))

    def least_used(self, exclude: WorkerClient | None = None) -> WorkerClient | None:
        now = time.monotonic()
        options = [w for w in self.workers() if w is not exclude and not w.draining]
        return min(options, key=lambda w: self.load(w, now).usage, default=None)

    # ------------------------------------------------------------------ rebalancer
    def start_background(self) -> None:
        if self.config.mode == "balanced":
            self._spawn(self._rebalance_loop())

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.rebalance_once()
            except Exception:
                log.exception("rebalancer step failed")

    def rebalance_once(self) -> Move | None:
        busy = {id(w) for m in self._moves.values() for w in (m.src, m.dst)}
        now = time.monotonic()
        by_address = {w.address: w for w in self.workers() if not w.draining and id(w) not in busy}
        loads = [self.load(w, now) for w in by_address.values()]
        decision = pick_migration(loads, self.config.min_gap)
        if decision is None:
            return None
        flight = self.flights[decision.request_id]
        try:
            return self.start(flight, by_address[decision.dest], "rebalance")
        except MigrationError as e:
            flight.retry_at = now + 1.0
            log.info("rebalancer could not move %s: %s", flight.rid, e)
            return None

    # ------------------------------------------------------------------ drain
    def drain(self, w: WorkerClient) -> DrainState:
        state = self.drains.get(w.address)
        if w.draining and state is not None and not state.done:
            return state
        w.draining = True
        state = self.drains[w.address] = DrainState()
        self._spawn(self._drain(w, state))
        return state

    def undrain(self, w: WorkerClient) -> None:
        w.draining = False
        self._changed.set()

    def remaining(self, w: WorkerClient) -> int:
        return sum(1 for f in self.flights.values() if f.decode is w)

    async def _drain(self, w: WorkerClient, state: DrainState) -> None:
        while w.draining:
            now = time.monotonic()
            mine = [f for f in self.flights.values() if f.decode is w]
            if not mine:
                state.done = True
                return
            moving = sum(1 for m in self._moves.values() if m.src is w)
            for f in mine:
                if moving >= self.config.max_concurrent:
                    break
                if f.move is not None or f.n_out < 2 or now < f.retry_at:
                    continue
                dst = self.least_used(exclude=w)
                if dst is None:
                    break
                try:
                    self.start(f, dst, "drain")
                    moving += 1
                except MigrationError:
                    f.retry_at = now + 0.2
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.2)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
