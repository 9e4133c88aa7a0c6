"""The Triton attention backend: paged decode (split-K) and chunked prefill kernels.

Chosen automatically on CUDA when Triton imports (``tandem.kernels.enabled``). One
``forward`` stores the new K/V (``store_kv``), runs the decode kernel over the sequences
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
from tandem.kernels.elementwise import store_kv


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
        return torch.tensor(values, dtype=torch.int32, device=device)

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

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        dm = meta.device
        if dm is None:
            dm = meta.device = device_meta(meta, q.device)
        if dm.decode_partition is None:
            part = choose_partition(
                dm.max_seq_len, max(dm.decode_idx.shape[0], 1), k_cache.shape[2], num_sms(q.device)
            )
            dm.decode_partition, dm.decode_splits = part, triton.cdiv(max(dm.max_seq_len, 1), part)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
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
