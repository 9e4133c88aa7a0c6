"""The Triton attention backend: paged decode (split-K) and chunked prefill kernels.

Chosen automatically on CUDA when Triton imports (``tandem.kernels.enabled``). One
``forward`` stores the new K/V (``store_kv``, or ``rotary_store_kv`` when the model hands it
the rotary: rotation and store in one launch), runs the decode kernel over the sequences
with one query token and the prefill kernel over the rest. It reads ``meta.device``
(built by ``prepare_inputs`` or by a CUDA-graph batch); without it, it builds one from the
host lists.
"""

from __future__ import annotations

import functools

import torch
import triton

from tandem.attention.base import AttentionBackend, AttentionMetadata, DeviceMeta
from tandem.attention.triton_decode import choose_partition, paged_decode
from tandem.attention.triton_prefill import paged_prefill
from tandem.kernels.elementwise import rotary_store_kv, store_kv


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton's interpreter on CPU (tests)
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_meta(meta: AttentionMetadata, device: torch.device) -> DeviceMeta:
    """The device tensors of ``meta`` from its host lists (one small copy each)."""
    q_lens = meta.query_lens()
    decode = [s for s, n in enumerate(q_lens) if n == 1]
    prefill = [s for s, n in enumerate(q_lens) if n > 1]

    def i32(values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int32)  # no blocking copy: see device_tensor
        return t if device.type == "cpu" else t.to(device, non_blocking=True)

    return DeviceMeta(
        seq_lens=i32(meta.seq_lens),
        query_start=i32(meta.query_start_loc),
        decode_idx=i32(decode),
        prefill_idx=i32(prefill),
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(meta.seq_lens, default=0),
    )


class TritonPagedBackend(AttentionBackend):
    name = "triton"
    fuses_rope = True

    def warm_up(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        sliding_window: int | None,
    ) -> None:
        """Compile every kernel variant serving can reach (decode with one and with several
        splits, prefill with 64- and 128-row tiles, the split reduction) before the first
        request, so no compilation happens inside the serving loop."""
        blocks = 40
        cache = torch.zeros(
            (2, blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )
        for q_lens in ([1, 1], [1, 32], [1, 100]):
            ctx = [block_size * 8, *q_lens[1:]]
            T = sum(q_lens)
            tables = torch.arange(blocks, device=device).view(2, blocks // 2)
            meta = AttentionMetadata(
                query_start_loc=[0, q_lens[0], T],
                seq_lens=[ctx[0], max(ctx[1], q_lens[1])],
                block_tables=tables,
                slot_mapping=torch.full((T,), -1, dtype=torch.long, device=device),
                block_size=block_size,
                sliding_window=sliding_window,
            )
            q = torch.zeros((T, num_heads, head_dim), dtype=dtype, device=device)
            kv = torch.zeros((T, num_kv_heads, head_dim), dtype=dtype, device=device)
            # The eager path's rotary + store (int64 positions and slots); CUDA graphs
            # compile their int32 variant when they are captured.
            rope = (
                torch.zeros(T, dtype=torch.long, device=device),
                torch.ones(head_dim // 2, dtype=torch.float32, device=device),
            )
            for splits in (1, 3):  # ONE_SPLIT and the partial + reduce path
                meta.device = device_meta(meta, device)
                meta.device.decode_partition = -(-ctx[0] // splits)
                meta.device.decode_splits = splits
                fused = rope if splits == 1 else None
                self.forward(q, kv, kv, cache[0], cache[1], meta, 1.0, rope=fused)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        dm = meta.device
        if dm is None:
            dm = meta.device = device_meta(meta, q.device)
        if dm.decode_partition is None:
            part = choose_partition(
                dm.max_seq_len, max(dm.decode_idx.shape[0], 1), k_cache.shape[2], num_sms(q.device)
            )
            dm.decode_partition, dm.decode_splits = part, triton.cdiv(max(dm.max_seq_len, 1), part)
        if rope is None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            rotary_store_kv(q, k, v, k_cache, v_cache, meta.slot_mapping, rope[0], rope[1])
        out = torch.empty_like(q)
        if dm.decode_idx.shape[0]:
            paged_decode(
                q, k_cache, v_cache, meta.block_tables, dm.seq_lens, dm.query_start,
                dm.decode_idx, out, scale, dm.decode_partition, dm.decode_splits,
                meta.sliding_window,
            )  # fmt: skip
        if dm.prefill_idx.shape[0]:
            paged_prefill(
                q, k_cache, v_cache, meta.block_tables, dm.seq_lens, dm.query_start,
                dm.prefill_idx, dm.max_query_len, out, scale, meta.sliding_window,
            )  # fmt: skip
        return out.reshape(q.shape[0], -1)
