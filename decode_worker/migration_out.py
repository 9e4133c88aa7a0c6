"""Source side of live migration: move one of this worker's running requests elsewhere.

The router sends ``migrate`` {request_id, dest_kv, final_blocks, max_stages,
min_copy_stages, fault?}. Then, for that request (Llumnix's stages; ``plan_stage``):

1. Copy stages. Between two engine steps the engine thread copies the request's full
   blocks not sent yet (``gather_request_blocks``); the asyncio side sends them as one KV
   transfer (``KVSender.send``: OFFER, the destination reserves, bytes, it writes them,
   DONE) while the request keeps decoding here. Full blocks never change, so the copy
   stays valid. Repeat with the blocks filled meanwhile.
2. Final stop-and-copy, once few blocks are unsent (or at the stage limit): between two
   steps the request leaves the batch (``detach_request``: its blocks stay held here),
   the rest of its blocks and its whole state are sent; the destination commits and
   resumes it.
3. DONE: the blocks here are freed and the router is told ``migrated`` on the request's
   connection, after every token this worker sent for it (same socket, same order), so
   the router switches the owner with nothing skipped or repeated.
4. Any failure — the request finished, was aborted or preempted meanwhile, a transfer was
   refused or failed, an injected fault — ends the migration with ``migrate_failed``; a
   detached request is put back in the batch (``restore_detached``) and goes on here. If
   the final DONE was lost (``maybe_committed``) the destination may run it: it is given
   up here with a worker-lost error, and the router cancels it there and re-runs it.

Threads: ``start`` and the stage loop run on the asyncio thread; everything that touches
the engine goes through ``service.in_engine`` (the engine thread).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from kvtransfer import KVBundle, TransferError
from tandem import env
from tandem.migration import Fault, StagePolicy, TransferId, plan_stage
from tandem.migration.plan import wants_block
from tandem.protocol import Message, Migrate, Migrated, MigrateFailed
from tandem.request import RequestStatus
from tandem.request_state import request_state

log = logging.getLogger("tandem.decode_worker")

BLOCK_WAIT_S = 60.0  # longest wait for a block to fill when more copy stages are asked for


class MigrationAborted(RuntimeError):
    pass


@dataclass
class OutStats:
    started: int = 0
    committed: int = 0
    aborted: int = 0
    blocks: int = 0
    stages: int = 0
    seconds: float = 0.0
    downtime_s: float = 0.0


@dataclass(frozen=True)
class _Job:
    conn: Any
    rid: str
    mid: int
    dest: str
    policy: StagePolicy
    fault: Fault | None


class MigrationOut:
    def __init__(self, service: Any, sender: Any) -> None:
        """``service``: the DecodeWorkerService; ``sender``: a ``KVSender``."""
        self.service, self.sender = service, sender
        self.engine = service.engine
        self.stats = OutStats()
        self._ids = itertools.count(1)
        self._active: set[str] = set()  # asyncio thread
        self._tasks: set[asyncio.Task] = set()
        self._detached: dict[str, Any] = {}  # engine thread: rid -> DetachedRequest
        self._stopped_at: dict[str, float] = {}  # engine thread: when it left the batch
        self._aborted: set[str] = set()  # engine thread: the router ended it while detached
        self._waiters: dict[str, tuple[int, asyncio.Future]] = {}  # engine thread

    # ------------------------------------------------------------------ asyncio thread
    def start(self, conn: Any, msg: Migrate) -> None:
        rid = str(msg.request_id)
        try:
            dest = str(msg.dest_kv)
            policy = StagePolicy(
                final_blocks=int(msg.final_blocks),
                max_stages=int(msg.max_stages),
                min_copy_stages=int(msg.min_copy_stages),
            )
            fault = Fault.parse(msg.fault)
            if fault is not None and not env.migration_faults_enabled():
                raise ValueError("fault injection is off (TANDEM_MIGRATION_FAULTS)")
        except (KeyError, TypeError, ValueError) as e:
            self._reply(conn, MigrateFailed(rid, f"bad migrate: {e}"))
            return
        if rid in self._active:
            self._reply(conn, MigrateFailed(rid, "already migrating"))
            return
        self._active.add(rid)
        self.stats.started += 1
        job = _Job(conn, rid, next(self._ids), dest, policy, fault)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, conn: Any, msg: Message) -> None:
        self.service._post(lambda: self.service._send(conn, msg))

    async def _run(self, job: _Job) -> None:
        t0 = time.monotonic()
        sent = index = blocks = 0
        base: int | None = None  # the request's preemption count at stage 0
        try:
            while True:
                loop = asyncio.get_running_loop()
                wait = loop.create_future()
                prepared = await self.service.in_engine(
                    lambda i=index, n=sent, b=base, w=wait: self._prepare(job, i, n, b, w)
                )
                if prepared is None:  # more copy stages wanted: wait for a block to fill
                    await asyncio.wait_for(wait, BLOCK_WAIT_S)
                    continue
                stage, bundle, base = prepared
                if job.fault is not None and job.fault.hits("source", stage.index, stage.final):
                    raise MigrationAborted(f"injected fault {job.fault}")
                await self.sender.send(job.dest, bundle)
                blocks, sent, index = blocks + stage.num_blocks, stage.end, index + 1
                if stage.final:
                    break
        except Exception as e:  # every failure leaves the request running here
            maybe = isinstance(e, TransferError) and e.maybe_committed
            if not isinstance(
                e, (TransferError, MigrationAborted, ValueError, asyncio.TimeoutError)
            ):
                log.exception("migration of %s crashed", job.rid)
            why = str(e) or type(e).__name__
            await self.service.in_engine(lambda: self._failed(job, why, maybe))
        else:
            done = time.monotonic()
            await self.service.in_engine(lambda: self._committed(job, blocks, index, t0, done))
        finally:
            self._active.discard(job.rid)

    # ------------------------------------------------------------------ engine thread
    def _prepare(self, job: _Job, index: int, sent: int, base: int | None, wait: Any):
        """The next stage and its bundle, or None (after registering ``wait``) when it
        must wait for a block to fill. Raises ``MigrationAborted`` if the request cannot
        move (any more)."""
        req = self.engine.scheduler.requests.get(job.rid)
        if req is None:
            raise MigrationAborted(f"request {job.rid!r} is not on this worker (finished?)")
        if req.status is not RequestStatus.RUNNING:
            raise MigrationAborted(f"request {job.rid!r} is {req.status.value}, not running")
        if base is not None and req.num_preemptions != base:
            raise MigrationAborted(f"request {job.rid!r} was preempted during its migration")
        bs = self.engine.scheduler.block_size
        n = req.num_computed_tokens
        if wants_block(job.policy, index, sent, n, bs):
            self._waiters[job.rid] = ((sent + 1) * bs, wait)
            return None
        stage = plan_stage(job.policy, index, sent, n, bs)
        tid = str(TransferId.of(job.rid, job.mid, stage))
        info = {"stage": index, "fault": str(job.fault) if job.fault else None}
        # Stage 0 names its full blocks: the destination shares those it has cached.
        names = self._block_names(job.rid, min(stage.end * bs, n)) if index == 0 else ()
        if not stage.final:
            payload = self.engine.gather_request_blocks(job.rid, stage.start, stage.end)
            bundle = KVBundle(tid, stage.num_blocks * bs, payload, {"migration": info}, names)
            return stage, bundle, req.num_preemptions
        d = self.engine.detach_request(job.rid, stage.start)
        self._detached[job.rid] = d
        self._stopped_at[job.rid] = time.monotonic()
        state = request_state(d.request, d.num_computed_tokens, d.policy_state)
        state["migration"] = info
        bundle = KVBundle(tid, d.num_computed_tokens - stage.start * bs, d.payload, state, names)
        return stage, bundle, req.num_preemptions

    def _block_names(self, rid: str, num_tokens: int) -> tuple[bytes, ...]:
        fn = getattr(self.engine, "block_names", None)
        return tuple(fn(rid, num_tokens)) if fn is not None else ()

    def after_step(self) -> None:
        """Wake stage loops waiting for a block to fill (or for a request that left)."""
        for rid, (target, fut) in list(self._waiters.items()):
            req = self.engine.scheduler.requests.get(rid)
            if req is None or req.num_computed_tokens >= target:
                del self._waiters[rid]
                self.service._loop.call_soon_threadsafe(_resolve, fut)

    def on_abort(self, rid: str) -> None:
        """The router ended ``rid``: a detached request must not come back here."""
        if rid in self._detached:
            self._aborted.add(rid)
        self.after_step()

    def _committed(self, job: _Job, blocks: int, stages: int, t0: float, done: float) -> None:
        d = self._detached.pop(job.rid)
        stopped = self._stopped_at.pop(job.rid)
        self._aborted.discard(job.rid)
        self.engine.release_detached(d)
        s = self.stats
        s.committed += 1
        s.blocks += blocks
        s.stages += stages
        s.seconds += done - t0
        s.downtime_s += done - stopped
        conn = self.service._owner.pop(job.rid, None)
        if conn is not None:
            conn.requests.discard(job.rid)
        msg = Migrated(job.rid, blocks, stages, seconds=done - t0, downtime_s=done - stopped)
        self.service._send(conn or job.conn, msg)

    def _failed(self, job: _Job, error: str, maybe_committed: bool) -> None:
        self.stats.aborted += 1
        self._waiters.pop(job.rid, None)
        self._stopped_at.pop(job.rid, None)
        d = self._detached.pop(job.rid, None)
        aborted = job.rid in self._aborted
        self._aborted.discard(job.rid)
        conn = self.service._owner.get(job.rid) or job.conn
        msg = MigrateFailed(job.rid, error, maybe_committed)
        self.service._send(conn, msg)  # before a worker-lost item: the router cancels there first
        log.info("migration of %s aborted: %s", job.rid, error)
        if d is None:
            return
        if aborted or maybe_committed:
            self.engine.release_detached(d)
            if maybe_committed and not aborted:
                self.service._lose(conn, job.rid, f"migration outcome unknown ({error})")
            return
        try:
            self.engine.restore_detached(d)  # it goes on here, where it stopped
        except Exception as e:
            log.exception("cannot put %s back after a failed migration", job.rid)
            self.engine.release_detached(d)
            self.service._lose(conn, job.rid, f"migration failed and restore failed ({e})")

    def as_stats(self) -> dict[str, Any]:
        s = self.stats
        return {
            "migrations_out_started": s.started,
            "migrations_out_committed": s.committed,
            "migrations_out_aborted": s.aborted,
            "migration_blocks": s.blocks,
            "migration_stages": s.stages,
            "migration_seconds": round(s.seconds, 6),
            "migration_downtime_seconds": round(s.downtime_s, 6),
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.sender.close()


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
