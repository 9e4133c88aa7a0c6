"""The attention backend contract and the per-iteration metadata it reads.

A batch is a flat run of T query tokens from S sequences. Sequence s owns query rows
``query_start_loc[s]:query_start_loc[s+1]`` whose positions are the *last* q_len
positions of its context: ``seq_lens[s] - q_len .. seq_lens[s] - 1``. Its K/V for
positions ``0 .. seq_lens[s]-1`` live in blocks ``block_tables[s]`` once this
iteration's new K/V are written at ``slot_mapping`` (slot = block_id * block_size +
offset). Query i attends key j iff ``j <= i`` (causal) and, with a sliding window W,
``j > i - W``. So prefill, chunked prefill over a cached prefix, and decode are one
rule with different q_len.

Backends that run on the device (Triton) also read the ``DeviceMeta`` tensors: the same
facts as int32 tensors on the device, plus which sequences decode (q_len == 1) and which
prefill. A CUDA-graph batch fills them into static buffers and fixes the decode split.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass
class DeviceMeta:
    seq_lens: torch.Tensor  # [S] int32
    query_start: torch.Tensor  # [S+1] int32
    decode_idx: torch.Tensor  # [n_decode] int32: sequences with q_len == 1
    prefill_idx: torch.Tensor  # [n_prefill] int32: sequences with q_len > 1
    max_query_len: int
    max_seq_len: int  # bound on seq_lens (a graph batch: the longest it may attend)
    decode_partition: int | None = None  # fixed split for graphs; None = backend picks
    decode_splits: int | None = None


@dataclass
class AttentionMetadata:
    query_start_loc: list[int]  # [S+1] host ints; query_start_loc[-1] == T
    seq_lens: list[int]  # [S] context length after this iteration's tokens
    block_tables: torch.Tensor  # [S, max_blocks] int64, padded with 0
    slot_mapping: torch.Tensor  # [T] int64
    block_size: int
    sliding_window: int | None = None
    device: DeviceMeta | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def query_lens(self) -> list[int]:
        q = self.query_start_loc
        return [q[i + 1] - q[i] for i in range(len(q) - 1)]


class AttentionBackend(abc.ABC):
    """Writes new K/V into the paged cache, then attends over it.

    Contract: ``forward`` stores ``k``/``v`` at ``meta.slot_mapping`` in
    ``k_cache``/``v_cache`` (shape [num_blocks, block_size, Hkv, D]) *before* reading,
    so a sequence sees its own new tokens; it returns [T, Hq * D]. It must not touch
    slots outside ``slot_mapping`` (other requests' blocks may be mid-transfer).

    A backend with ``fuses_rope`` also accepts ``rope=(positions [T], inv_freq [D/2])``:
    q and k then arrive unrotated, and it applies neox rotary to both (q in place) before
    the store, in the same launch as the store (the model passes it only to such a
    backend, and only on the Triton path).
    """

    name: str = "abstract"
    fuses_rope: bool = False

    def warm_up(  # noqa: B027 (optional hook: most backends have nothing to prepare)
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        sliding_window: int | None,
    ) -> None:
        """Called once before serving: prepare (compile) whatever the first requests would
        otherwise wait for. Must not touch KV slots anyone owns."""

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...
