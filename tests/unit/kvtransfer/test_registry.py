"""Backends by name."""

from __future__ import annotations

import pytest

from kvtransfer import LocalKVSender, TcpKVReceiver, make_receiver, make_sender
from tests.unit.kvtransfer.fakes import HASH, FakeEngineKV


def test_registry_builds_each_backend_and_names_the_choices():
    fake = FakeEngineKV()
    assert isinstance(make_sender("local", HASH), LocalKVSender)
    assert isinstance(make_receiver("tcp", HASH, fake, port=0), TcpKVReceiver)
    with pytest.raises(ValueError, match=r"unknown KV transfer backend 'rdma'.*local.*nccl.*tcp"):
        make_sender("rdma", HASH)
