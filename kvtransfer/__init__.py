"""Moving KV bytes between engines: contracts (``base``) and backends by name.

``BACKENDS`` maps a name to its sender and receiver classes; ``make_sender`` and
``make_receiver`` build them: ``local`` (one process), ``tcp`` (sockets), ``nccl`` (the tcp
control plane, K/V bytes GPU to GPU over NCCL; CuPy is imported only when one is built).
Imports torch (payload tensors), never the engine: the engine side is callbacks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvtransfer.base import (
    KVBundle,
    KVReceiver,
    KVSender,
    ReceiverCallbacks,
    RefuseReason,
    TransferError,
    TransferMetrics,
    TransferRefused,
    TransferState,
    TransferTimeout,
)
from kvtransfer.comm import CommError, LoopbackComms
from kvtransfer.inbound import InboundTransfers
from kvtransfer.local import LocalKVReceiver, LocalKVSender
from kvtransfer.nccl import NcclKVReceiver, NcclKVSender
from kvtransfer.tcp import TcpKVReceiver, TcpKVSender
from kvtransfer.wire import Offer
from tandem.kvcache.block_pool import NoFreeBlocksError


class Backend(NamedTuple):
    sender: type[KVSender]
    receiver: type[KVReceiver]


BACKENDS: dict[str, Backend] = {
    "tcp": Backend(TcpKVSender, TcpKVReceiver),
    "local": Backend(LocalKVSender, LocalKVReceiver),
    "nccl": Backend(NcclKVSender, NcclKVReceiver),
}


def _backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; available: {sorted(BACKENDS)}"
        ) from None


def make_sender(name: str, compat_hash: str, **options: Any) -> KVSender:
    """Sender of backend ``name`` (options: ``timeout_s``, and the backend's own)."""
    return _backend(name).sender(compat_hash, **options)


def make_receiver(
    name: str, compat_hash: str, callbacks: ReceiverCallbacks, **options: Any
) -> KVReceiver:
    """Receiver of backend ``name`` (options: ``lease_s``, and the backend's own);
    ``await receiver.start()`` before use."""
    return _backend(name).receiver(compat_hash, callbacks, **options)


__all__ = [
    "BACKENDS",
    "Backend",
    "CommError",
    "InboundTransfers",
    "KVBundle",
    "KVReceiver",
    "KVSender",
    "LocalKVReceiver",
    "LocalKVSender",
    "LoopbackComms",
    "NcclKVReceiver",
    "NcclKVSender",
    "NoFreeBlocksError",
    "Offer",
    "ReceiverCallbacks",
    "RefuseReason",
    "TcpKVReceiver",
    "TcpKVSender",
    "TransferError",
    "TransferMetrics",
    "TransferRefused",
    "TransferState",
    "TransferTimeout",
    "make_receiver",
    "make_sender",
]
