"""The host KV tier's bytes, and int8 compression of swapped blocks (ALISE).

Block-major, so that one block is one contiguous run of host memory and a run of
consecutive block ids is one ``cudaMemcpyAsync`` (a strided pinned destination would make
torch stage the copy through pageable memory and block):

    data    [num_blocks, layers, 2 (K, V), block_size, Hkv, D]   KV dtype, or int8
    scales  [num_blocks, layers, 2, Hkv] float32                   only with int8

On CUDA both live in pinned memory. With int8, each (block, layer, K/V, head) slice is
stored as ``round(x / s)`` with ``s = absmax / 127`` (per-head, per-block absmax), and read
back as ``q · s`` in the KV dtype: at most ``s / 2`` absolute error per element.

Payloads (what ``store`` takes and ``load`` returns) are block-major too:
[n, layers, 2, block_size, Hkv, D] in the KV dtype, on the device that computes.
Quantisation runs where the payload is: on the GPU before the copy, so int8 halves the
bytes that cross PCIe for 16-bit KV (a quarter for float32), plus the scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.config import ModelConfig


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, L, 2, bs, H, D] -> (q int8 [n, L, 2, bs, H, D], scale float32 [n, L, 2, H])."""
    absmax = x.abs().amax(dim=(3, 5)).float()  # [n, L, 2, H]
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(x.float() / scale[:, :, :, None, :, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_int8`` up to rounding: [n, L, 2, bs, H, D] in ``dtype``."""
    return (q.float() * scale[:, :, :, None, :, None]).to(dtype)


def contiguous_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split ids into runs of consecutive ascending ids: (index in ids, first id, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            idx, first, n = runs[-1]
            runs[-1] = (idx, first, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


class HostKVTier:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        int8: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.block_shape = (model.num_layers, 2, block_size, model.num_kv_heads, model.head_dim)
        self.dtype = dtype  # the KV dtype payloads come in and go out as
        self.int8 = int8
        store_dtype = torch.int8 if int8 else dtype
        self.data = torch.zeros(
            (num_blocks, *self.block_shape), dtype=store_dtype, pin_memory=pin_memory
        )
        self.scales = (
            torch.ones(
                (num_blocks, model.num_layers, 2, model.num_kv_heads),
                dtype=torch.float32,
                pin_memory=pin_memory,
            )
            if int8
            else None
        )

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    @property
    def bytes_per_block(self) -> int:
        n = self.data[0].numel() * self.data.element_size()
        if self.scales is not None:
            n += self.scales[0].numel() * self.scales.element_size()
        return n

    def store(self, block_ids: Sequence[int], payload: torch.Tensor) -> None:
        """Write payload [n, ...] into host blocks ``block_ids`` (pairwise).

        From a CUDA payload the copies are asynchronous on the current stream: the
        caller must not read these host blocks from the CPU before that stream is past
        them (the tier is only read by ``load`` on the same stream).
        """
        if payload.shape[0] != len(block_ids) or tuple(payload.shape[1:]) != self.block_shape:
            raise ValueError(
                f"KV payload {tuple(payload.shape)} does not fit {len(block_ids)} host blocks "
                f"of {self.block_shape}"
            )
        nb = payload.device.type == "cuda"
        if self.scales is not None:
            payload, scale = quantize_int8(payload)
            for i, first, n in contiguous_runs(block_ids):
                self.scales[first : first + n].copy_(scale[i : i + n], non_blocking=nb)
        else:
            payload = payload.to(self.dtype)
        for i, first, n in contiguous_runs(block_ids):
            self.data[first : first + n].copy_(payload[i : i + n], non_blocking=nb)

    def load(self, block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """Payload [n, ...] of host blocks ``block_ids`` on ``device``, in the KV dtype
        (asynchronous on the current stream for a CUDA device)."""
        nb = device.type == "cuda"
        n_ids = len(block_ids)
        runs = contiguous_runs(block_ids)
        q = torch.empty((n_ids, *self.block_shape), dtype=self.data.dtype, device=device)
        for i, first, n in runs:
            q[i : i + n].copy_(self.data[first : first + n], non_blocking=nb)
        if self.scales is None:
            return q
        scale = torch.empty((n_ids, *self.scales.shape[1:]), dtype=torch.float32, device=device)
        for i, first, n in runs:
            scale[i : i + n].copy_(self.scales[first : first + n], non_blocking=nb)
        return dequantize_int8(q, scale, self.dtype)
