"""Worker registry: who serves, where, with what load (pure asyncio; no torch).

Contract (``Registry``):
- ``register(info, ttl)``: announce a worker; the entry expires ``ttl`` seconds after
  the last ``register``/``heartbeat`` unless renewed.
- ``heartbeat(worker_id, load, ttl)``: renew the entry and publish its current load
  (free/used KV blocks, running/waiting requests, queued prefill tokens).
- ``deregister(worker_id)``: leave at once (clean shutdown).
- ``workers()``: every live (unexpired) entry.

A worker whose process dies or hangs stops heartbeating, so its entry disappears within
its TTL and the router stops dispatching to it. Backends: ``memory`` (one process; the
expiry is checked on read) and ``redis`` (``redis://host:port/db``; Redis expires keys
itself, so routers on other machines see the same view). ``make_registry(url)`` picks one.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

ROLES = ("prefill", "decode", "colocated")


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    address: str  # control plane HOST:PORT
    model: str = ""
    kv_address: str | None = None  # KV transfer endpoint, if any
    capacity: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {self.role!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerInfo:
        return cls(**json.loads(text))


class Registry(abc.ABC):
    name = "abstract"

    @abc.abstractmethod
    async def register(self, info: WorkerInfo, ttl: float) -> None: ...

    @abc.abstractmethod
    async def heartbeat(self, worker_id: str, load: dict[str, Any], ttl: float) -> None: ...

    @abc.abstractmethod
    async def deregister(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def workers(self) -> list[WorkerInfo]: ...

    async def close(self) -> None:  # noqa: B027 (optional)
        pass


class InProcessRegistry(Registry):
    name = "memory"

    def __init__(self, clock=time.monotonic) -> None:
        self._entries: dict[str, tuple[WorkerInfo, float]] = {}
        self._clock = clock

    async def register(self, info: WorkerInfo, ttl: float) -> None:
        info.updated_at = time.time()
        self._entries[info.worker_id] = (info, self._clock() + ttl)

    async def heartbeat(self, worker_id: str, load: dict[str, Any], ttl: float) -> None:
        entry = self._entries.get(worker_id)
        if entry is None:
            raise KeyError(f"worker {worker_id!r} is not registered (expired?)")
        info = entry[0]
        info.load, info.updated_at = dict(load), time.time()
        self._entries[worker_id] = (info, self._clock() + ttl)

    async def deregister(self, worker_id: str) -> None:
        self._entries.pop(worker_id, None)

    async def workers(self) -> list[WorkerInfo]:
        now = self._clock()
        for wid in [w for w, (_, expiry) in self._entries.items() if expiry <= now]:
            del self._entries[wid]
        return [info for info, _ in self._entries.values()]


class RedisRegistry(Registry):
    """One key per worker, ``{prefix}:worker:{id}`` = JSON, with a Redis TTL."""

    name = "redis"

    def __init__(self, url: str, prefix: str = "tandem") -> None:
        import redis.asyncio as redis_asyncio

        self._redis = redis_asyncio.from_url(url)
        self._prefix = prefix
        self.url = url

    def _key(self, worker_id: str) -> str:
        return f"{self._prefix}:worker:{worker_id}"

    async def register(self, info: WorkerInfo, ttl: float) -> None:
        info.updated_at = time.time()
        await self._redis.set(self._key(info.worker_id), info.to_json(), px=max(int(ttl * 1000), 1))

    async def heartbeat(self, worker_id: str, load: dict[str, Any], ttl: float) -> None:
        raw = await self._redis.get(self._key(worker_id))
        if raw is None:
            raise KeyError(f"worker {worker_id!r} is not registered (expired?)")
        info = WorkerInfo.from_json(raw)
        info.load, info.updated_at = dict(load), time.time()
        await self._redis.set(self._key(worker_id), info.to_json(), px=max(int(ttl * 1000), 1))

    async def deregister(self, worker_id: str) -> None:
        await self._redis.delete(self._key(worker_id))

    async def workers(self) -> list[WorkerInfo]:
        keys = [
            k async for k in self._redis.scan_iter(match=f"{self._prefix}:worker:*", count=1000)
        ]
        if not keys:
            return []
        values = await self._redis.mget(keys)
        return [WorkerInfo.from_json(v) for v in values if v is not None]

    async def close(self) -> None:
        await self._redis.aclose()


REGISTRIES = {"memory": InProcessRegistry, "redis": RedisRegistry}


def make_registry(url: str | None) -> Registry:
    """``None`` or ``memory://`` → in-process; ``redis://...`` → Redis."""
    if url is None or url.startswith("memory://"):
        return InProcessRegistry()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRegistry(url)
    raise ValueError(f"unknown registry URL {url!r}: use redis://host:port[/db] or memory://")
