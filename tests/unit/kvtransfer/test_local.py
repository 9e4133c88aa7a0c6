"""The local backend's own paths: the lease without a socket, unknown peers."""

from __future__ import annotations

import asyncio

import pytest

from kvtransfer import LocalKVReceiver, LocalKVSender, TransferError
from kvtransfer.wire import Offer
from tests.unit.kvtransfer.fakes import HASH, FakeEngineKV, eventually, make_bundle

pytestmark = pytest.mark.asyncio


async def test_lease_frees_a_reservation_that_is_never_delivered():
    fake = FakeEngineKV()
    receiver = LocalKVReceiver(HASH, fake, lease_s=0.1)
    bundle = make_bundle("r")
    offer = Offer.for_payload("r", bundle.num_tokens, bundle.payload, HASH, 0)
    assert len(await receiver.offer(offer)) == 3
    await eventually(lambda: fake.count("abort", "r") == 1)
    with pytest.raises(TransferError, match="lapsed"):
        await receiver.deliver("r", bundle.state, bundle.payload)
    assert fake.count("commit") == 0 and receiver.metrics.failed == 1
    fake.assert_clean()
    await receiver.offer(offer)  # the id is free again at once: a retry can go through
    await receiver.deliver("r", bundle.state, bundle.payload)
    assert list(fake.committed) == ["r"] and receiver.metrics.ok == 1
    fake.assert_clean()


async def test_unknown_peer_is_an_error():
    sender = LocalKVSender(HASH, peers=[LocalKVReceiver(HASH, FakeEngineKV(), address="d0")])
    with pytest.raises(TransferError, match=r"no local receiver at 'd1'; known: \['d0'\]"):
        await sender.send("d1", make_bundle("r"))
    await asyncio.sleep(0)
