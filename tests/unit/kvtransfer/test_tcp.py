"""The tcp backend against stalled, killed and silent peers, and under concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch

from kvtransfer import TcpKVReceiver, TcpKVSender, TransferError, TransferTimeout, wire
from kvtransfer.wire import Offer
from tandem import protocol
from tests.unit.kvtransfer.fakes import HASH, FakeEngineKV, eventually, make_bundle, same_bits

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def tcp_receiver(fake: FakeEngineKV, **options):
    receiver = TcpKVReceiver(HASH, fake, **options)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.close()


async def raw_offer(receiver: TcpKVReceiver, request_id: str, **bundle_options):
    """A hand-driven sender: sends the OFFER, returns the connection, the answer and the
    bytes a real sender would stream next."""
    bundle = make_bundle(request_id, **bundle_options)
    state = wire.pack_state(bundle.state)
    offer = Offer.for_payload(request_id, bundle.num_tokens, bundle.payload, HASH, len(state))
    reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
    writer.write(protocol.pack_frame({"type": "kv_offer", **offer.to_dict()}))
    await writer.drain()
    answer = await protocol.read_frame(reader)
    return reader, writer, answer, state + bytes(wire.tensor_to_bytes(bundle.payload))


async def test_lease_frees_the_reservation_when_the_sender_stalls_mid_payload():
    fake = FakeEngineKV()
    async with tcp_receiver(fake, lease_s=0.2) as receiver:
        reader, writer, answer, body = await raw_offer(receiver, "r")
        assert answer["type"] == "kv_accept"
        writer.write(body[: len(body) // 2])  # ... and then nothing, connection left open
        await writer.drain()
        assert fake.kv.pending_imports() == ["r"]
        t0 = time.monotonic()
        await eventually(lambda: fake.count("abort", "r") == 1)
        assert time.monotonic() - t0 < 3.0
        assert await reader.read() == b""  # the receiver dropped the stalled connection
        assert receiver.transfers() == {} and receiver.metrics.failed == 1
        fake.assert_clean()
        writer.close()


async def test_connection_killed_mid_payload_aborts_at_once():
    fake = FakeEngineKV()
    async with tcp_receiver(fake, lease_s=60.0) as receiver:
        _, writer, answer, body = await raw_offer(receiver, "r")
        assert answer["type"] == "kv_accept"
        writer.write(body[:100])
        await writer.drain()
        writer.transport.abort()
        await eventually(lambda: fake.count("abort", "r") == 1, timeout=3.0)  # not the lease
        fake.assert_clean()


async def test_receiver_dying_mid_payload_fails_the_sender_and_frees_both_sides():
    fake = FakeEngineKV(num_blocks=300)
    big = make_bundle(
        "big", num_tokens=1024, dtype=torch.float32, layers=4, kv_heads=8, head_dim=128
    )
    assert big.payload.numel() * 4 >= 32 * 2**20  # far above any socket buffer
    receiver = TcpKVReceiver(HASH, fake)
    await receiver.start()
    reserve = fake.reserve

    def reserve_then_die(request_id, num_tokens):
        asyncio.get_running_loop().call_later(0.01, lambda: asyncio.ensure_future(receiver.close()))
        return reserve(request_id, num_tokens)

    fake.reserve = reserve_then_die
    sender = TcpKVSender(HASH, timeout_s=30.0, chunk_bytes=256 * 2**10)
    t0 = time.monotonic()
    with pytest.raises(TransferError) as err:
        await sender.send(receiver.address, big)
    assert not isinstance(err.value, TransferTimeout) and time.monotonic() - t0 < 10.0
    assert not err.value.maybe_committed  # it broke while bytes were still moving
    await eventually(lambda: fake.count("abort", "big") == 1)
    assert not fake.committed
    fake.assert_clean()
    await sender.close()


async def test_sender_times_out_on_a_silent_receiver():
    conns = []

    async def silent(reader, writer):
        conns.append(writer)
        await protocol.read_frame(reader)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = TcpKVSender(HASH, timeout_s=0.3)
    with pytest.raises(TransferTimeout, match="stopped while offered") as err:
        await sender.send(f"127.0.0.1:{port}", make_bundle("r"))
    assert not err.value.maybe_committed  # it never accepted: nothing can be committed
    assert sender.metrics.failed == 1 and sender.connections_opened == 1
    await sender.close()
    server.close()
    for writer in conns:
        writer.close()


async def test_twenty_concurrent_transfers_over_one_receiver():
    fake = FakeEngineKV(num_blocks=512)
    async with tcp_receiver(fake) as receiver:
        sender = TcpKVSender(HASH, max_connections=8, chunk_bytes=4096)
        bundles = [
            make_bundle(f"r{i}", num_tokens=1 + 7 * i, dtype=torch.bfloat16, head_dim=32, seed=i)
            for i in range(20)
        ]
        await asyncio.gather(*(sender.send(receiver.address, b) for b in bundles))
        for b in bundles:
            _, payload, state = fake.committed[b.request_id]
            assert same_bits(payload, b.payload) and state == b.state
        assert sender.metrics.ok == receiver.metrics.ok == 20
        assert 1 <= sender.connections_opened <= 8
        await sender.close()
    fake.assert_clean()


async def test_idle_connection_is_reused_and_a_dead_one_replaced():
    fake = FakeEngineKV()
    sender = TcpKVSender(HASH)
    async with tcp_receiver(fake) as receiver:
        port = receiver.port
        for i in range(3):
            await sender.send(receiver.address, make_bundle(f"a{i}"))
        assert sender.connections_opened == 1
    async with tcp_receiver(fake, port=port) as again:  # a restarted receiver, same address
        await sender.send(again.address, make_bundle("b"))
        assert sender.connections_opened == 2
    await sender.close()
    assert sorted(fake.committed) == ["a0", "a1", "a2", "b"]
    fake.assert_clean()


async def test_malformed_offer_is_refused_and_the_connection_stays_usable():
    fake = FakeEngineKV()
    async with tcp_receiver(fake) as receiver:
        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        writer.write(protocol.pack_frame({"type": "kv_offer", "request_id": "r", "num_blocks": 1}))
        answer = await protocol.read_frame(reader)
        assert answer["type"] == "kv_refuse" and answer["reason"] == "bad_offer"
        assert "malformed offer" in answer["error"]
        writer.close()
    assert fake.calls == []
