"""Tensor and state codec, and the offer's self-checks."""

from __future__ import annotations

import msgpack
import pytest
import torch

from kvtransfer import wire
from kvtransfer.wire import Offer
from tests.unit.kvtransfer.fakes import HASH, make_bundle, same_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact(dtype):
    payload = make_bundle("r", num_tokens=13, dtype=dtype, seed=3).payload  # NaN/inf bits too
    name = wire.dtype_name(dtype)
    data = wire.tensor_to_bytes(payload)
    assert data.nbytes == payload.numel() * payload.element_size()
    back = wire.tensor_from_bytes(bytes(data), name, payload.shape)
    assert same_bits(back, payload)
    joined = bytearray(b"".join(wire.chunks(data, 1000)))  # chunking loses nothing
    assert same_bits(wire.tensor_from_bytes(joined, name, payload.shape), payload)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_empty_payloads(dtype):
    base = torch.randn(2, 2, 3, 4, 8, 2).to(dtype)
    strided = base.transpose(4, 5)  # [.., 2, 8], not contiguous
    back = wire.tensor_from_bytes(
        wire.tensor_to_bytes(strided), wire.dtype_name(dtype), strided.shape
    )
    assert same_bits(back, strided.contiguous())
    empty = torch.empty(2, 2, 0, 4, 2, 8, dtype=dtype)
    data = wire.tensor_to_bytes(empty)
    assert data.nbytes == 0
    assert wire.tensor_from_bytes(data, wire.dtype_name(dtype), empty.shape).shape == empty.shape


def test_size_and_dtype_mismatches_are_errors():
    with pytest.raises(ValueError, match="needs 64"):
        wire.tensor_from_bytes(b"\0" * 63, "float32", (4, 4))
    with pytest.raises(ValueError, match="unknown KV payload dtype 'int8'"):
        wire.tensor_from_bytes(b"", "int8", (0,))
    with pytest.raises(ValueError, match="not transferable"):
        wire.dtype_name(torch.int64)


def test_state_round_trip_and_refusals():
    state = make_bundle("r").state
    assert wire.unpack_state(wire.pack_state(state)) == state
    with pytest.raises(ValueError, match="not msgpack-able"):
        wire.pack_state({"x": object()})
    with pytest.raises(ValueError, match="must be a dict"):
        wire.pack_state([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a map"):
        wire.unpack_state(msgpack.packb([1, 2]))


def test_offer_describes_the_payload_and_checks_itself():
    bundle = make_bundle("r", num_tokens=10, dtype=torch.bfloat16)
    offer = Offer.for_payload("r", 10, bundle.payload, HASH, state_nbytes=5)
    assert offer.num_blocks == 3 and offer.dtype == "bfloat16"
    assert offer.payload_nbytes == bundle.payload.numel() * 2
    assert Offer.from_dict(msgpack.unpackb(msgpack.packb(offer.to_dict()))) == offer
    bad = {**offer.to_dict(), "num_tokens": 13}  # 13 tokens need 4 blocks of 4
    with pytest.raises(ValueError, match="need 4 blocks"):
        Offer.from_dict(bad)
    with pytest.raises(ValueError, match="does not fit"):
        Offer.from_dict({**offer.to_dict(), "payload_nbytes": 1})
    with pytest.raises(ValueError, match="malformed offer"):
        Offer.from_dict({"request_id": "r"})
    with pytest.raises(ValueError, match="payload shape"):
        Offer.for_payload("r", 10, torch.zeros(3, 4), HASH, 0)
