"""Torch reference attention over paged KV: correct everywhere, fast enough on CPU.

Sequences with q_len > 1 (prefill chunks) run one by one through SDPA with an explicit
causal(+window) mask offset by their cached prefix. Sequences with q_len == 1 (decodes)
are gathered into one padded batch so a decode-heavy iteration costs one SDPA call.

On CUDA, SDPA's cuDNN backend is excluded: it builds an execution graph for every new
shape, and paged serving produces a new (batch, context) shape almost every step. Measured
on an H200 (bench/offload_step_trace.py), that host-side build took 7.6 ms per call and
doubled the step time of a swap-heavy run; the memory-efficient and flash kernels have no
per-shape cost.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tandem.attention.base import AttentionBackend, AttentionMetadata

_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def forward(self, q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ctx = sdpa_kernel(_CUDA_SDPA) if q.is_cuda else contextlib.nullcontext()
        with ctx:
            return self._forward(q, *args, **kwargs)

    def _forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        num_heads = q.shape[1]
        group = num_heads // num_kv_heads
        flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
        flat_k[meta.slot_mapping] = k
        flat_v[meta.slot_mapping] = v

        out = torch.empty_like(q)
        q_lens = meta.query_lens()
        decode_rows = [s for s, n in enumerate(q_lens) if n == 1]
        for s, n in enumerate(q_lens):
            if n == 1:
                continue
            start = meta.query_start_loc[s]
            ctx = meta.seq_lens[s]
            slots = self._slots(meta, s, ctx, block_size)
            keys = flat_k[slots].transpose(0, 1)  # [Hkv, ctx, D]
            vals = flat_v[slots].transpose(0, 1)
            q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if meta.sliding_window is not None:
                mask &= k_pos > q_pos - meta.sliding_window
            qs = q[start : start + n].transpose(0, 1)  # [Hq, n, D]
            o = F.scaled_dot_product_attention(
                qs, keys, vals, attn_mask=mask, scale=scale, enable_gqa=group > 1
            )
            out[start : start + n] = o.transpose(0, 1)
        if decode_rows:
            self._decode_batch(q, flat_k, flat_v, meta, decode_rows, group, scale, out)
        return out.reshape(q.shape[0], num_heads * head_dim)

    @staticmethod
    def _slots(meta: AttentionMetadata, s: int, ctx: int, block_size: int) -> torch.Tensor:
        nb = (ctx + block_size - 1) // block_size
        blocks = meta.block_tables[s, :nb]
        offsets = torch.arange(block_size, device=blocks.device)
        return (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:ctx]

    def _decode_batch(
        self,
        q: torch.Tensor,
        flat_k: torch.Tensor,
        flat_v: torch.Tensor,
        meta: AttentionMetadata,
        rows: list[int],
        group: int,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        block_size = meta.block_size
        ctxs = torch.tensor([meta.seq_lens[s] for s in rows], device=q.device)
        max_ctx = int(ctxs.max())
        nb = (max_ctx + block_size - 1) // block_size
        tables = meta.block_tables[rows, :nb]  # [B, nb]
        offsets = torch.arange(block_size, device=q.device)
        slots = (tables[:, :, None] * block_size + offsets).reshape(len(rows), -1)[:, :max_ctx]
        keys = flat_k[slots].permute(0, 2, 1, 3)  # [B, Hkv, L, D]
        vals = flat_v[slots].permute(0, 2, 1, 3)
        k_pos = torch.arange(max_ctx, device=q.device)[None, :]
        mask = k_pos < ctxs[:, None]  # the query sits at position ctx-1
        if meta.sliding_window is not None:
            mask &= k_pos > (ctxs[:, None] - 1 - meta.sliding_window)
        starts = [meta.query_start_loc[s] for s in rows]
        qs = q[starts][:, :, None, :]  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(
            qs, keys, vals, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=group > 1
        )
        out[starts] = o[:, :, 0, :]
