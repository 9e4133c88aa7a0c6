"""Bytes of a KV transfer: the offer, payload tensors, request state (no engine logic,
no pickle).

``Offer`` is the handshake's first message: every size and the layout of what follows,
so the receiver can check it and reserve blocks before a payload byte moves.

A payload tensor travels as three things: its dtype *name* (one of ``DTYPES``), its shape,
and its raw bytes in C order. The name and shape ride in the OFFER; the bytes follow it as
a plain stream, so ``tensor_from_bytes(tensor_to_bytes(t), dtype_name(t.dtype), t.shape)``
is bit-exact for every dtype here (bfloat16 included: bytes are never converted through
another float type). Both ends must share a byte order; every machine Tandem runs on is
little-endian.

The request state is a msgpack map (``pack_state`` / ``unpack_state``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

CHUNK_BYTES = 4 * 2**20  # write/read granularity of a payload stream
MAX_STATE_BYTES = 64 * 2**20


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"KV payload dtype {dtype} is not transferable; supported: {sorted(DTYPES)}"
        ) from None


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown KV payload dtype {name!r}; supported: {sorted(DTYPES)}"
        ) from None


def payload_nbytes(name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of dtype ``name`` and ``shape``."""
    itemsize = torch.empty((), dtype=to_dtype(name)).element_size()
    return math.prod(shape) * itemsize


def tensor_to_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, as a flat byte view (no copy for a contiguous CPU
    tensor; a device tensor is copied to the host first). The view keeps its memory alive."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_from_bytes(
    data: bytes | bytearray | memoryview, name: str, shape: Sequence[int]
) -> torch.Tensor:
    """Inverse of ``tensor_to_bytes``. Shares ``data``'s memory when it is writable
    (a ``bytearray``), copies it otherwise. ``ValueError`` if the size does not fit."""
    dtype = to_dtype(name)
    shape = tuple(int(s) for s in shape)
    expected = payload_nbytes(name, shape)
    view = memoryview(data).cast("B")
    if view.nbytes != expected:
        raise ValueError(
            f"KV payload has {view.nbytes} bytes; {name} {list(shape)} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        view = memoryview(bytearray(view))
    return torch.frombuffer(view, dtype=torch.uint8).view(dtype).reshape(shape)


def chunks(data: memoryview, size: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Consecutive slices of at most ``size`` bytes (none for empty data)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    for start in range(0, data.nbytes, size):
        yield data[start : start + size]


def pack_state(state: dict[str, Any]) -> bytes:
    """msgpack bytes of a request's state; ``ValueError`` if it is not msgpack-able."""
    if not isinstance(state, dict):
        raise ValueError(f"request state must be a dict, got {type(state).__name__}")
    try:
        return msgpack.packb(state, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"request state is not msgpack-able: {e}") from None


def unpack_state(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        state = msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"request state is not valid msgpack: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"request state must be a map, got {type(state).__name__}")
    return state


@dataclass(frozen=True)
class Offer:
    """The handshake's first message: everything the receiver checks before reserving.

    ``block_names``: the prefix-cache names of the payload's leading full blocks
    (``tandem.kvcache.prefix``), possibly fewer than it has, possibly none. A receiver
    that already holds the first ``k`` of them answers ACCEPT with ``skip = k``; both ends
    then move ``skip(k)``, the offer for the payload without its first ``k`` blocks.
    """

    request_id: str
    compat_hash: str
    num_blocks: int
    num_tokens: int
    state_nbytes: int
    payload_nbytes: int
    dtype: str
    shape: tuple[int, ...]
    block_names: tuple[bytes, ...] = ()

    @classmethod
    def for_payload(
        cls,
        request_id: str,
        num_tokens: int,
        p: torch.Tensor,
        compat_hash: str,
        state_nbytes: int,
        block_names: Sequence[bytes] = (),
    ) -> Offer:
        """The offer for sending ``p``; ``ValueError`` if it is not a valid payload."""
        if p.dim() != 6:
            raise ValueError(
                f"payload shape must be [layers, 2, n_blocks, block_size, Hkv, D], got {list(p.shape)}"
            )
        offer = cls(
            request_id=request_id,
            compat_hash=compat_hash,
            num_blocks=p.shape[2],
            num_tokens=num_tokens,
            state_nbytes=state_nbytes,
            payload_nbytes=p.numel() * p.element_size(),
            dtype=dtype_name(p.dtype),
            shape=tuple(p.shape),
            block_names=tuple(block_names),
        )
        offer.check()
        return offer

    def skip(self, k: int) -> Offer:
        """The offer for the same payload without its first ``k`` blocks (the receiver
        holds them). ``ValueError`` unless ``0 <= k <= len(block_names)``."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(self.block_names):
            raise ValueError(
                f"cannot skip {k!r} blocks of an offer naming {len(self.block_names)} blocks"
            )
        if k == 0:
            return self
        shape = (*self.shape[:2], self.shape[2] - k, *self.shape[3:])
        return Offer(
            request_id=self.request_id,
            compat_hash=self.compat_hash,
            num_blocks=self.num_blocks - k,
            num_tokens=self.num_tokens - k * self.shape[3],
            state_nbytes=self.state_nbytes,
            payload_nbytes=payload_nbytes(self.dtype, shape),
            dtype=self.dtype,
            shape=shape,
            block_names=(),
        )

    def check(self) -> None:
        """``ValueError`` unless the fields agree with each other."""
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        ints = (self.num_blocks, self.num_tokens, self.state_nbytes, self.payload_nbytes)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
            raise ValueError(f"sizes must be ints >= 0: {ints}")
        shape = self.shape
        if len(shape) != 6 or any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
            raise ValueError(
                f"payload shape must be [layers, 2, n_blocks, block_size, Hkv, D], got {shape}"
            )
        if shape[1] != 2 or shape[2] != self.num_blocks or shape[3] < 1:
            raise ValueError(f"payload shape {list(shape)} does not hold {self.num_blocks} blocks")
        if math.ceil(self.num_tokens / shape[3]) != self.num_blocks:
            raise ValueError(
                f"{self.num_tokens} tokens need {math.ceil(self.num_tokens / shape[3])} blocks "
                f"of {shape[3]}, offer has {self.num_blocks}"
            )
        if payload_nbytes(self.dtype, shape) != self.payload_nbytes:
            raise ValueError(
                f"payload_nbytes {self.payload_nbytes} does not fit {self.dtype} {list(shape)}"
            )
        if self.state_nbytes > MAX_STATE_BYTES:
            raise ValueError(f"state of {self.state_nbytes} bytes exceeds {MAX_STATE_BYTES}")
        names = self.block_names
        if not isinstance(names, tuple) or any(not isinstance(n, bytes) for n in names):
            raise ValueError("block_names must be a tuple of bytes")
        if len(names) > min(self.num_blocks, self.num_tokens // shape[3]):
            raise ValueError(
                f"{len(names)} block names for {self.num_tokens} tokens: only full blocks "
                "have names"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["block_names"] = list(self.block_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Offer:
        """Parse and ``check``; ``ValueError`` on anything malformed."""
        try:
            offer = cls(
                request_id=d["request_id"],
                compat_hash=str(d["compat_hash"]),
                num_blocks=d["num_blocks"],
                num_tokens=d["num_tokens"],
                state_nbytes=d["state_nbytes"],
                payload_nbytes=d["payload_nbytes"],
                dtype=d["dtype"],
                shape=tuple(d["shape"]),
                block_names=tuple(d.get("block_names") or ()),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed offer: {e!r}") from None
        offer.check()
        return offer
