"""Attention over a paged KV cache.

``AttentionBackend`` is the contract; ``BACKENDS`` maps names to implementations:
``torch`` (the reference, any device) and ``triton`` (paged kernels, CUDA).
``default_backend_name(device)`` picks ``triton`` on CUDA when Triton imports (and
``TANDEM_TRITON`` is not 0), else ``torch``. The Triton module is imported only when used.
"""

from __future__ import annotations

from tandem.attention.base import AttentionBackend, AttentionMetadata, DeviceMeta
from tandem.attention.torch_ref import TorchReferenceBackend


def _triton_backend() -> type[AttentionBackend]:
    from tandem.attention.triton_backend import TritonPagedBackend

    return TritonPagedBackend


BACKENDS = {"torch": lambda: TorchReferenceBackend, "triton": _triton_backend}


def default_backend_name(device: str) -> str:
    from tandem.kernels import triton_available

    return "triton" if device.startswith("cuda") and triton_available() else "torch"


def get_backend(name: str = "torch") -> AttentionBackend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}"
        ) from None
    return factory()()


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "DeviceMeta",
    "TorchReferenceBackend",
    "default_backend_name",
    "get_backend",
]
