"""The transfer contract, checked on every backend: success only after the receiver
committed, refusals that reserve nothing, and no reservation left behind by any failure."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvtransfer import (
    BACKENDS,
    RefuseReason,
    TcpKVReceiver,
    TcpKVSender,
    TransferError,
    TransferRefused,
    TransferTimeout,
    make_receiver,
    make_sender,
)
from tests.unit.kvtransfer.fakes import (
    HASH,
    FakeEngineKV,
    eventually,
    make_bundle,
    pair,
    peer_options,
    same_bits,
)

pytestmark = pytest.mark.asyncio
backends = pytest.mark.parametrize("backend", sorted(BACKENDS))


@backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_transfer_delivers_identical_payload_and_state(backend, dtype):
    fake = FakeEngineKV()
    async with pair(backend, fake) as (sender, receiver):
        bundles = [make_bundle(f"r{i}", num_tokens=9 + i, dtype=dtype, seed=i) for i in range(2)]
        for b in bundles:
            await sender.send(receiver.address, b)
        for b in bundles:
            block_ids, payload, state = fake.committed[b.request_id]
            assert same_bits(payload, b.payload)
            assert state == b.state
            assert len(block_ids) == b.payload.shape[2]
            assert fake.count("commit", b.request_id) == 1
        assert fake.count("abort") == 0
        nbytes = sum(b.payload.numel() * b.payload.element_size() for b in bundles)
        for m in (sender.metrics, receiver.metrics):
            assert (m.ok, m.failed) == (2, 0)
            assert m.bytes > nbytes and m.seconds > 0
        assert receiver.transfers() == {}
    fake.assert_clean()


@backends
async def test_sender_succeeds_only_after_the_receiver_committed(backend):
    fake = FakeEngineKV()
    fake.commit_gate = asyncio.Event()
    async with pair(backend, fake) as (sender, receiver):
        task = asyncio.create_task(sender.send(receiver.address, make_bundle("r")))
        await eventually(lambda: fake.count("commit") == 1)
        await asyncio.sleep(0.05)
        assert not task.done() and "r" not in fake.committed
        fake.commit_gate.set()
        await task
        assert "r" in fake.committed and sender.metrics.ok == 1


@backends
async def test_compat_mismatch_is_refused_naming_both_hashes(backend):
    fake = FakeEngineKV()
    async with pair(backend, fake, sender_hash="aaaa1111", receiver_hash="bbbb2222") as (s, r):
        with pytest.raises(TransferRefused, match="KV layout mismatch") as err:
            await s.send(r.address, make_bundle("r"))
        assert err.value.reason is RefuseReason.INCOMPATIBLE
        assert "aaaa1111" in str(err.value) and "bbbb2222" in str(err.value)
        assert not err.value.maybe_committed
        assert fake.calls == []  # nothing reserved, not even asked
        assert (s.metrics.refused, r.metrics.refused) == (1, 1)
    fake.assert_clean()


@backends
async def test_no_free_blocks_is_refused(backend):
    fake = FakeEngineKV(num_blocks=2)
    async with pair(backend, fake) as (sender, receiver):
        with pytest.raises(TransferRefused, match="no free blocks") as err:
            await sender.send(receiver.address, make_bundle("r", num_tokens=10))  # 3 blocks
        assert err.value.reason is RefuseReason.NO_FREE_BLOCKS
        await sender.send(receiver.address, make_bundle("small", num_tokens=8))  # still usable
    assert fake.count("abort") == 0 and list(fake.committed) == ["small"]
    fake.assert_clean()


@backends
async def test_commit_failure_aborts_the_reservation(backend):
    fake = FakeEngineKV()
    fake.fail_commit.add("bad")
    async with pair(backend, fake) as (sender, receiver):
        with pytest.raises(TransferError, match="disk on fire") as err:
            await sender.send(receiver.address, make_bundle("bad"))
        assert not isinstance(err.value, TransferRefused) and not err.value.maybe_committed
        assert fake.count("abort", "bad") == 1
        await sender.send(receiver.address, make_bundle("good"))
        if isinstance(sender, TcpKVSender):
            assert sender.connections_opened == 1  # a failed commit leaves the stream in sync
    fake.assert_clean()


@backends
async def test_sender_times_out_when_done_never_comes(backend):
    fake = FakeEngineKV()
    fake.commit_gate = asyncio.Event()  # never set: the receiver never answers DONE
    async with pair(backend, fake, timeout_s=0.3) as (sender, receiver):
        with pytest.raises(TransferTimeout, match="no DONE within 0.3s") as err:
            await sender.send(receiver.address, make_bundle("r"))
        # Over a network the receiver may have committed; in-process we know it did not.
        assert err.value.maybe_committed is (backend != "local")
        assert sender.metrics.failed == 1
    assert fake.count("abort", "r") == 1 and not fake.committed  # closing cancels the commit
    fake.assert_clean()


@backends
async def test_duplicate_in_flight_id_is_refused(backend):
    fake = FakeEngineKV()
    fake.commit_gate = asyncio.Event()
    async with pair(backend, fake) as (sender, receiver):
        other = make_sender(backend, HASH, **peer_options(backend, receiver))
        first = asyncio.create_task(sender.send(receiver.address, make_bundle("dup")))
        await eventually(lambda: fake.count("commit") == 1)
        with pytest.raises(TransferRefused, match="already in flight") as err:
            await other.send(receiver.address, make_bundle("dup", seed=9))
        assert err.value.reason is RefuseReason.DUPLICATE
        with pytest.raises(TransferRefused, match="already being sent by this sender"):
            await sender.send(receiver.address, make_bundle("dup"))
        fake.commit_gate.set()
        await first
        await other.close()
    assert fake.count("reserve", "dup") == 1 and fake.count("commit", "dup") == 1
    assert same_bits(fake.committed["dup"][1], make_bundle("dup").payload)
    fake.assert_clean()


@backends
async def test_receiver_close_aborts_open_reservations(backend):
    fake = FakeEngineKV()
    receiver = make_receiver(backend, HASH, fake, **peer_options(backend))
    await receiver.start()
    from kvtransfer.wire import Offer

    bundle = make_bundle("r")
    offer = Offer.for_payload("r", bundle.num_tokens, bundle.payload, HASH, 10)
    if isinstance(receiver, TcpKVReceiver):
        from tandem import protocol

        reader, writer = await asyncio.open_connection("127.0.0.1", receiver.port)
        frame = {"type": "kv_offer", "payload": backend, **offer.to_dict()}
        writer.write(protocol.pack_frame(frame))
        assert (await protocol.read_frame(reader))["type"] == "kv_accept"
    else:
        await receiver.offer(offer)
    assert fake.kv.pending_imports() == ["r"]
    await receiver.close()
    assert fake.count("abort", "r") == 1
    fake.assert_clean()
    if isinstance(receiver, TcpKVReceiver):
        writer.close()
