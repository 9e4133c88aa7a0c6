"""Attention over a paged KV cache.

``AttentionBackend`` is the contract; ``BACKENDS`` maps names to implementations.
On CPU the torch reference is used; CUDA kernels plug in behind the same contract.
"""

from __future__ import annotations

from tandem.attention.base import AttentionBackend, AttentionMetadata
from tandem.attention.torch_ref import TorchReferenceBackend

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchReferenceBackend}


def get_backend(name: str = "torch") -> AttentionBackend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}"
        ) from None


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "TorchReferenceBackend",
    "get_backend",
]
