"""A submit that cannot be encoded holds no slot on the worker (pure)."""

from __future__ import annotations

import pytest

from router.workers import WorkerClient
from tandem.protocol import ProtocolError, Submit
from tandem.request import SamplingParams


class _Writer:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)


def _client() -> WorkerClient:
    client = WorkerClient("127.0.0.1:1")
    client._writer, client.hello = _Writer(), {"role": "colocated"}  # a live connection
    return client


def test_unencodable_submit_registers_nothing():
    client = _client()
    with pytest.raises((OverflowError, TypeError, ValueError, ProtocolError)):
        client.submit(Submit("r1", [1], SamplingParams(seed=2**70)))
    assert client.in_flight == 0 and client._writer.frames == []
    client.submit(Submit("r2", [1], SamplingParams(seed=7)))
    assert client.in_flight == 1 and len(client._writer.frames) == 1


def test_unencodable_expect_registers_nothing():
    client = _client()
    with pytest.raises((OverflowError, TypeError, ValueError)):
        client.expect(2**70, None)  # type: ignore[arg-type]
    assert client.in_flight == 0
