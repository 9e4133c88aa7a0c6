"""Triton kernels for the CUDA path: fused elementwise ops the model runs per layer.

Each kernel has a torch reference (in ``tandem/models/layers.py``) that defines its
arithmetic; the kernel must agree with it to rounding. The model calls the kernel only when
``enabled(tensor)``: the tensor is on CUDA, Triton imports, and ``TANDEM_TRITON`` is not
``0``. On CPU the references run, which keeps float32 parity with transformers exact.
Tests exercise the kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
Attention kernels live in ``tandem/attention``.
"""

from __future__ import annotations

import functools

import torch

from tandem import env


@functools.cache
def triton_available() -> bool:
    if not env.triton_enabled():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def enabled(t: torch.Tensor) -> bool:
    """True when ``t``'s ops should go through the Triton kernels."""
    return t.is_cuda and triton_available()
