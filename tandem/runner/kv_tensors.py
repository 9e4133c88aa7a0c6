"""The bytes behind a tier of KV blocks, and moving blocks between tiers.

One tensor per tier: ``data`` [num_layers, 2 (K, V), num_blocks, block_size, Hkv, D].
Per-layer K and V views are what attention reads and writes. ``gather`` and ``scatter``
move whole blocks; they are the byte half of the export/import primitive (the
bookkeeping half is tandem/kvcache) for handoff and migration. Swaps to the host tier
use the block-major copies of ``host_kv`` / ``kv_swap`` instead (pinned, asynchronous).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tandem.config import ModelConfig


class KVTensors:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def bytes_per_block(self) -> int:
        d = self.data
        return d.element_size() * d[:, :, 0].numel()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.data.shape[0])]

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy of the blocks: [layers, 2, n, block_size, Hkv, D], contiguous."""
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        return self.data.index_select(2, idx)

    def scatter(self, block_ids: Sequence[int], payload: torch.Tensor) -> None:
        """Write ``payload`` (as returned by ``gather``) into ``block_ids``."""
        if payload.shape[2] != len(block_ids) or payload.shape[3:] != self.data.shape[3:]:
            raise ValueError(
                f"KV payload shape {tuple(payload.shape)} does not fit {len(block_ids)} blocks of {tuple(self.data.shape[3:])}"
            )
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        # A non-blocking copy into CPU memory may still be in flight when the CPU reads it,
        # so only device-bound copies are asynchronous (the stream orders those).
        async_ok = self.device.type != "cpu"
        moved = payload.to(device=self.device, dtype=self.data.dtype, non_blocking=async_ok)
        self.data.index_copy_(2, idx, moved)
        if moved.is_cuda:
            # ``moved`` may live in another stream's memory (a KV receiver's staging buffer on
            # its NCCL stream): keep the allocator from reusing it before this copy ran.
            moved.record_stream(torch.cuda.current_stream(moved.device))
