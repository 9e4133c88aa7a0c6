"""Registry backends: TTL expiry, heartbeats, deregistration (memory + a real Redis)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import pytest

from tandem.registry import InProcessRegistry, RedisRegistry, WorkerInfo, make_registry


def info(wid: str, role: str = "decode") -> WorkerInfo:
    return WorkerInfo(worker_id=wid, role=role, address=f"127.0.0.1:{1000 + int(wid[1:])}")


async def exercise(reg, advance) -> None:
    await reg.register(info("w1"), ttl=2.0)
    await reg.register(info("w2", "prefill"), ttl=2.0)
    assert sorted(w.worker_id for w in await reg.workers()) == ["w1", "w2"]
    await advance(1.2)
    await reg.heartbeat("w1", {"kv_free": 7}, ttl=2.0)
    await advance(1.2)  # w2 silent for 2.4 s > ttl: gone; w1 renewed at 1.2 s: alive
    live = await reg.workers()
    assert [w.worker_id for w in live] == ["w1"] and live[0].load == {"kv_free": 7}
    with pytest.raises(KeyError, match="not registered"):
        await reg.heartbeat("w2", {}, ttl=2.0)
    await reg.deregister("w1")
    assert await reg.workers() == []


def test_in_process_registry_expires_silent_workers():
    now = [0.0]
    reg = InProcessRegistry(clock=lambda: now[0])

    async def advance(dt):
        now[0] += dt

    asyncio.run(exercise(reg, advance))


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_registry_expires_silent_workers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

        async def main():
            reg = make_registry(f"redis://127.0.0.1:{port}/0")
            assert isinstance(reg, RedisRegistry)
            await exercise(reg, asyncio.sleep)
            await reg.close()

        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_inputs():
    with pytest.raises(ValueError, match="role"):
        WorkerInfo(worker_id="x", role="boss", address="h:1")
    with pytest.raises(ValueError, match="unknown registry URL"):
        make_registry("zookeeper://x")
