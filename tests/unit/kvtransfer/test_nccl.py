"""The nccl backend's control flow on a CPU, with in-process fake communicators
(``LoopbackComms``): lazy set-up with the id exchange, one communicator per pair, per-pair
ordering, and every NCCL failure turned into a failed transfer, a freed reservation and a
new communicator for the next transfer. (The common contract runs in test_contract.py.)"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from kvtransfer import (
    LoopbackComms,
    NcclKVReceiver,
    NcclKVSender,
    RefuseReason,
    TcpKVReceiver,
    TcpKVSender,
    TransferError,
    TransferRefused,
    TransferTimeout,
    make_sender,
)
from kvtransfer.nccl_cupy import uid_to_bytes
from tests.unit.kvtransfer.fakes import HASH, FakeEngineKV, eventually, make_bundle, same_bits

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def nccl_pair(fake: FakeEngineKV, comms: LoopbackComms, timeout_s=10.0, lease_s=10.0):
    receiver = NcclKVReceiver(HASH, fake, lease_s=lease_s, device="cpu", comms=comms)
    await receiver.start()
    sender = NcclKVSender(HASH, timeout_s=timeout_s, device="cpu", comms=comms)
    try:
        yield sender, receiver
    finally:
        await sender.close()
        await receiver.close()


async def test_communicator_is_made_on_first_use_and_kept_for_the_pair():
    fake, comms = FakeEngineKV(), LoopbackComms()
    async with nccl_pair(fake, comms) as (sender, receiver):
        assert comms.connects == 0  # nothing before the first transfer
        bundles = [make_bundle(f"r{i}", dtype=torch.bfloat16, seed=i) for i in range(3)]
        for b in bundles:
            await sender.send(receiver.address, b)
        assert comms.connects == 2  # one communicator: rank 0 here, rank 1 there
        assert sender.connections_opened == 1
        for b in bundles:
            _, payload, state = fake.committed[b.request_id]
            assert same_bits(payload, b.payload) and state == b.state
    fake.assert_clean()


async def test_one_destination_is_served_in_order_while_others_proceed():
    comms = LoopbackComms()
    fakes = [FakeEngineKV(), FakeEngineKV()]
    receivers = [NcclKVReceiver(HASH, f, device="cpu", comms=comms) for f in fakes]
    for r in receivers:
        await r.start()
    sender = NcclKVSender(HASH, device="cpu", comms=comms)
    comms.send_gate.clear()  # every NCCL send waits here
    sends = [sender.send(receivers[0].address, make_bundle(f"a{i}", seed=i)) for i in range(3)]
    sends.append(sender.send(receivers[1].address, make_bundle("b")))
    tasks = [asyncio.create_task(s) for s in sends]
    await eventually(lambda: comms.sending() == 2)  # one per pair, the pairs in parallel
    await asyncio.sleep(0.1)
    assert comms.sending() == 2 and comms.peak_sending == 1
    assert [f.count("reserve") for f in fakes] == [1, 1]  # the others wait before offering
    comms.send_gate.set()
    await asyncio.gather(*tasks)
    assert sorted(fakes[0].committed) == ["a0", "a1", "a2"] and list(fakes[1].committed) == ["b"]
    assert comms.connects == 4 and comms.peak_sending == 1
    await sender.close()
    for r, f in zip(receivers, fakes, strict=True):
        await r.close()
        f.assert_clean()


async def test_failed_send_frees_the_reservation_and_the_next_transfer_gets_a_new_pair():
    fake, comms = FakeEngineKV(), LoopbackComms()
    comms.faults.append(("send", "error"))
    async with nccl_pair(fake, comms) as (sender, receiver):
        with pytest.raises(TransferError, match="NCCL send failed") as err:
            await sender.send(receiver.address, make_bundle("bad"))
        assert not err.value.maybe_committed
        await eventually(lambda: fake.count("abort", "bad") == 1)
        await eventually(lambda: all(c.aborted.is_set() for c in comms.comms))  # both ends
        await sender.send(receiver.address, make_bundle("good"))
        assert comms.connects == 4 and sender.connections_opened == 2
        assert "good" in fake.committed and "bad" not in fake.committed
    fake.assert_clean()


async def test_hung_send_times_out_and_the_receiver_frees_at_once():
    fake, comms = FakeEngineKV(), LoopbackComms()
    comms.faults.append(("send", "hang"))
    async with nccl_pair(fake, comms, timeout_s=0.5, lease_s=60.0) as (sender, receiver):
        with pytest.raises(TransferTimeout, match="stopped while streaming") as err:
            await sender.send(receiver.address, make_bundle("r"))
        assert not err.value.maybe_committed  # the send never completed
        await eventually(lambda: fake.count("abort", "r") == 1)  # the hang-up, not the lease
        await eventually(lambda: all(c.aborted.is_set() for c in comms.comms))
        await sender.send(receiver.address, make_bundle("r"), timeout_s=10.0)
        assert "r" in fake.committed
    fake.assert_clean()


async def test_lease_lapsing_mid_payload_fails_the_sender_and_discards_the_pair():
    fake, comms = FakeEngineKV(), LoopbackComms()
    comms.faults.append(("send", "hang"))
    async with nccl_pair(fake, comms, timeout_s=30.0, lease_s=0.3) as (sender, receiver):
        with pytest.raises(TransferError) as err:
            await sender.send(receiver.address, make_bundle("r"))
        assert not isinstance(err.value, TransferTimeout) and not err.value.maybe_committed
        assert fake.count("abort", "r") == 1 and receiver.metrics.failed == 1
        await eventually(lambda: all(c.aborted.is_set() for c in comms.comms))
    fake.assert_clean()


async def test_failed_receive_fails_the_transfer_and_renews_the_pair():
    fake, comms = FakeEngineKV(), LoopbackComms()
    comms.faults.append(("recv", "error"))
    async with nccl_pair(fake, comms) as (sender, receiver):
        with pytest.raises(TransferError, match="NCCL receive failed") as err:
            await sender.send(receiver.address, make_bundle("r"))
        assert not err.value.maybe_committed and fake.count("abort", "r") == 1
        await sender.send(receiver.address, make_bundle("r2"))
        assert "r2" in fake.committed and comms.connects == 4
    fake.assert_clean()


@pytest.mark.parametrize("rank_that_fails", ["first", "second"])
async def test_failed_set_up_fails_before_anything_is_reserved(rank_that_fails):
    fake, comms = FakeEngineKV(), LoopbackComms(connect_timeout_s=0.3)
    comms.faults.append(("connect", "error"))
    if rank_that_fails == "second":  # the first caller passes, the second one fails
        comms.faults.insert(0, ("connect", "ok"))
    async with nccl_pair(fake, comms) as (sender, receiver):
        with pytest.raises(TransferError) as err:
            await sender.send(receiver.address, make_bundle("r"))
        assert not err.value.maybe_committed and fake.calls == []
        await sender.send(receiver.address, make_bundle("r"))
        assert "r" in fake.committed
    fake.assert_clean()


async def test_mismatched_payload_legs_fail_with_a_clear_message():
    fake, comms = FakeEngineKV(), LoopbackComms()
    nccl_receiver = NcclKVReceiver(HASH, fake, device="cpu", comms=comms)
    tcp_receiver = TcpKVReceiver(HASH, fake)
    await nccl_receiver.start()
    await tcp_receiver.start()
    tcp_sender = TcpKVSender(HASH)
    nccl_sender = NcclKVSender(HASH, device="cpu", comms=comms)
    with pytest.raises(TransferRefused, match="takes nccl payloads, the sender offered tcp") as e:
        await tcp_sender.send(nccl_receiver.address, make_bundle("a"))
    assert e.value.reason is RefuseReason.BAD_OFFER
    with pytest.raises(TransferError, match="takes tcp payloads"):
        await nccl_sender.send(tcp_receiver.address, make_bundle("b"))
    assert fake.calls == []
    for end in (tcp_sender, nccl_sender, nccl_receiver, tcp_receiver):
        await end.close()


async def test_without_cupy_the_backend_says_what_to_install():
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed here")
    with pytest.raises(RuntimeError, match="needs CuPy with NCCL"):
        make_sender("nccl", HASH, device="cpu")


async def test_unique_id_round_trips_from_either_cupy_form():
    raw = bytes(range(256))[:128]
    signed = tuple(b - 256 if b > 127 else b for b in raw)  # CuPy < 14: signed chars
    assert uid_to_bytes(signed) == raw and uid_to_bytes(raw) == raw
