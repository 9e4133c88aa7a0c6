"""The router's admin endpoints: live migration by hand, draining a worker, worker load.

    POST   /admin/migrate        {"request_id": ID, "to": WORKER (default: least used),
                                  "min_copy_stages": N (default 0), "fault": "SIDE:POINT"}
           -> 200 {"request_id", "from", "to", "outcome": "committed" | "aborted",
                   "error" (aborted), "blocks", "stages", "seconds", "downtime_s"}
              once the move has ended (an aborted move leaves the request on its source)
    POST   /admin/drain/WORKER   -> 202 {"worker", "draining": true, "remaining"}: new
                                  requests avoid it; everything on it is migrated off
    GET    /admin/drain/WORKER   -> 200 {"worker", "draining", "done", "remaining",
                                  "migrated", "failed"}
    DELETE /admin/drain/WORKER   -> 200 {"worker", "draining": false}
    GET    /admin/workers        -> 200 {"migration": MODE, "workers": [{"address",
                                  "worker_id", "role", "draining", "usage", "demand_blocks",
                                  "kv_blocks", "requests"}]}

ID is the id the client got (``cmpl-...``); WORKER an address as in /metrics or a worker
id. ``fault`` is for tests only (``TANDEM_MIGRATION_FAULTS=1``, see ``tandem.env``).
Errors are JSON with a message: 400 bad body or argument, 404 unknown request or worker,
409 migration off or the request cannot move now, 503 worker unavailable, 504 no end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from router.migration import MigrationError, Migrator
from router.openai_api import ApiError
from tandem import env
from tandem.migration import Fault

MIGRATE_WAIT_S = 120.0


def _fail(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(ApiError(status, message, param).body(), status=status)


class Admin:
    def __init__(self, migrator: Migrator) -> None:
        self.m = migrator

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/admin/migrate", self.migrate),
            web.post("/admin/drain/{worker}", self.drain),
            web.get("/admin/drain/{worker}", self.drain_status),
            web.delete("/admin/drain/{worker}", self.undrain),
            web.get("/admin/workers", self.workers),
        ]

    def _require_on(self) -> None:
        if self.m.config.mode == "off":
            raise ApiError(
                409, "migration is off; start the router with --migration manual or balanced"
            )

    def _worker(self, name: str):
        w = self.m.find_worker(name)
        if w is None:
            raise ApiError(404, f"unknown worker {name!r}", "worker")
        if w not in self.m.workers():
            raise ApiError(
                400, f"{name} is not a connected decode worker that can migrate", "worker"
            )
        return w

    async def migrate(self, request: web.Request) -> web.Response:
        try:
            self._require_on()
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "request body must be a JSON object")
            rid = body.get("request_id")
            if not isinstance(rid, str) or not rid:
                raise ApiError(400, "'request_id' must be a non-empty string", "request_id")
            fault = body.get("fault")
            if fault is not None:
                if not env.migration_faults_enabled():
                    raise ApiError(
                        400,
                        "fault injection is off (TANDEM_MIGRATION_FAULTS=1 turns it on)",
                        "fault",
                    )
                try:
                    fault = str(Fault.parse(fault))
                except ValueError as e:
                    raise ApiError(400, str(e), "fault") from None
            stages = body.get("min_copy_stages", 0)
            if (
                isinstance(stages, bool)
                or not isinstance(stages, int)
                or not 0 <= stages < self.m.config.max_stages
            ):
                raise ApiError(
                    400,
                    f"'min_copy_stages' must be an integer in [0, {self.m.config.max_stages})",
                    "min_copy_stages",
                )
            flight = self.m.flights.get(rid)
            if flight is None:
                raise ApiError(404, f"unknown request {rid!r} (not in flight here)", "request_id")
            to = body.get("to")
            if to is None:
                dst = self.m.least_used(exclude=flight.decode)
                if dst is None:
                    raise ApiError(409, "no other decode worker to migrate to", "to")
            elif not isinstance(to, str):
                raise ApiError(400, "'to' must be a worker address or id", "to")
            else:
                dst = self._worker(to)
            move = self.m.start(flight, dst, "admin", fault, stages)
        except ApiError as e:
            return _fail(e.status, e.message, e.param)
        except MigrationError as e:
            return _fail(e.status, str(e))
        try:
            result = await asyncio.wait_for(asyncio.shield(move.done), MIGRATE_WAIT_S)
        except asyncio.TimeoutError:
            return _fail(504, f"migration of {rid} did not end within {MIGRATE_WAIT_S:.0f}s")
        return web.json_response(result)

    def _drain_target(self, request: web.Request):
        self._require_on()
        return self._worker(request.match_info["worker"])

    async def drain(self, request: web.Request) -> web.Response:
        try:
            w = self._drain_target(request)
            others = [o for o in self.m.workers() if o is not w and not o.draining]
            if not others:
                raise ApiError(409, f"no other decode worker to drain {w.address} to", "worker")
        except ApiError as e:
            return _fail(e.status, e.message, e.param)
        self.m.drain(w)
        body = {"worker": w.address, "draining": True, "remaining": self.m.remaining(w)}
        return web.json_response(body, status=202)

    async def drain_status(self, request: web.Request) -> web.Response:
        try:
            w = self._drain_target(request)
        except ApiError as e:
            return _fail(e.status, e.message, e.param)
        state = self.m.drains.get(w.address)
        body = {"worker": w.address, "draining": w.draining, "remaining": self.m.remaining(w),
                "done": bool(state and state.done), "migrated": state.migrated if state else 0,
                "failed": state.failed if state else 0}  # fmt: skip
        return web.json_response(body)

    async def undrain(self, request: web.Request) -> web.Response:
        try:
            w = self._drain_target(request)
        except ApiError as e:
            return _fail(e.status, e.message, e.param)
        self.m.undrain(w)
        return web.json_response({"worker": w.address, "draining": False})

    async def workers(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for w in self.m.workers():
            load = self.m.load(w, now)
            ids = [f.rid for f in self.m.flights.values() if f.decode is w]
            out.append({"address": w.address, "worker_id": w.hello.get("worker_id"),
                        "role": w.role, "draining": w.draining, "usage": round(load.usage, 6),
                        "demand_blocks": load.demand, "kv_blocks": load.capacity,
                        "requests": ids})  # fmt: skip
        return web.json_response({"migration": self.m.config.mode, "workers": out})
