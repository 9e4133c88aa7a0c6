"""A worker's load as the router reports it: current while connected; once the connection
drops, only ``up 0``, never its last blocks and running requests."""

from __future__ import annotations

import asyncio

from router.metrics import RouterMetrics
from router.workers import WorkerClient
from tandem import protocol

HELLO = protocol.Hello(role="colocated", model="m", compat="c", kv_blocks=64, max_num_seqs=8,
                       max_model_len=128, vocab_size=100)  # fmt: skip
STATS = protocol.Stats({"running": 3, "waiting": 1, "kv_used": 40, "kv_free": 24})


def _worker_lines(text: str, address: str) -> list[str]:
    return [line for line in text.splitlines() if f'worker="{address}"' in line]


def test_a_disconnected_worker_reports_up_0_and_no_stale_gauges():
    async def scenario() -> None:
        conns: list[asyncio.StreamWriter] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(protocol.encode(HELLO) + protocol.encode(STATS))
            conns.append(writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = WorkerClient(address)
        metrics = RouterMetrics()
        assert client.stats == {"up": 0}  # not connected yet
        await client.connect(timeout=5)
        for _ in range(100):
            if client.stats.get("running") == 3:
                break
            await asyncio.sleep(0.01)
        lines = _worker_lines(metrics.render({address: client.stats}), address)
        assert f'tandem_worker_up{{worker="{address}"}} 1' in lines
        assert f'tandem_worker_running_requests{{worker="{address}"}} 3' in lines
        assert f'tandem_worker_kv_blocks_used{{worker="{address}"}} 40' in lines

        conns[0].close()  # the worker dies
        server.close()
        for _ in range(100):
            if not client.connected:
                break
            await asyncio.sleep(0.01)
        assert client.stats == {"up": 0}
        lines = _worker_lines(metrics.render({address: client.stats}), address)
        assert lines == [f'tandem_worker_up{{worker="{address}"}} 0']
        await client.close()

    asyncio.run(scenario())
