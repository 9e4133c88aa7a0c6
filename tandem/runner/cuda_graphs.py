"""CUDA graphs for decode batches: one captured forward pass per batch-size bucket.

A decode-only iteration of B sequences (every chunk is one token) replays the graph of the
smallest bucket >= B. The graph reads static buffers — input ids, positions, slots, block
tables, sequence lengths — that ``run`` fills with one host-to-device copy each; rows past
B are padding (slot -1: no K/V store; sequence length 0: attention writes zeros). The
graph ends with the LM head, so ``run`` returns the logits of the first B rows and the only
host synchronisation left per token is reading the sampled ids.

Invariants:
- Captured once, after the KV tensors exist, with the Triton attention backend; a batch
  that needs more than ``max_blocks_per_seq`` blocks or more rows than the largest bucket
  is not graphable (``can_run`` is False) and runs eagerly.
- The decode split (partition, number of splits) is fixed per bucket for the longest
  context allowed (``max_model_len``); shorter sequences skip the empty splits.
- Graphs share one memory pool and are captured largest first.
"""

from __future__ import annotations

import torch

from tandem.attention import AttentionBackend, AttentionMetadata, DeviceMeta
from tandem.attention.triton_backend import num_sms
from tandem.attention.triton_decode import choose_partition
from tandem.sched.output import SchedulerOutput


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch`` (and ``max_batch``)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
        backend: AttentionBackend,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        sliding_window: int | None,
    ) -> None:
        self.model, self.kv_layers, self.backend = model, kv_layers, backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sliding_window = sliding_window
        device = kv_layers[0][0].device
        self.device = device
        n = max_batch
        i64 = dict(dtype=torch.long, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slots = torch.full((n,), -1, **i64)
        self.tables = torch.zeros((n, self.max_blocks_per_seq), **i64)
        self.seq_lens = torch.zeros(n, **i32)
        self.query_start = torch.arange(n + 1, **i32)
        self.seq_idx = torch.arange(n, **i32)
        self.no_prefill = torch.zeros(0, **i32)
        self._host = torch.zeros((4, n), dtype=torch.long).pin_memory()
        self._host_tables = torch.zeros((n, self.max_blocks_per_seq), dtype=torch.long).pin_memory()
        self._host_tables_np = self._host_tables.numpy()
        self._row_keys: list[int | None] = [None] * n
        self._dev = torch.zeros((4, n), **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.buckets = batch_buckets(max_batch)
        self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        kv_heads = self.kv_layers[0][0].shape[2]
        part = choose_partition(self.max_model_len, b, kv_heads, num_sms(self.device))
        return AttentionMetadata(
            query_start_loc=list(range(b + 1)),
            seq_lens=[0] * b,
            block_tables=self.tables[:b],
            slot_mapping=self.slots[:b],
            block_size=self.block_size,
            sliding_window=self.sliding_window,
            device=DeviceMeta(
                seq_lens=self.seq_lens[:b],
                query_start=self.query_start[: b + 1],
                decode_idx=self.seq_idx[:b],
                prefill_idx=self.no_prefill,
                max_query_len=1,
                max_seq_len=self.max_model_len,
                decode_partition=part,
                decode_splits=-(-self.max_model_len // part),
            ),
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(
            self.input_ids[:b], self.positions[:b], self.kv_layers, self._meta(b), self.backend
        )
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                self._forward(b)  # warm-up: Triton compiles, the allocator settles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[b] = self._forward(b)
                self.graphs[b] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def bucket_for(self, batch: int) -> int:
        """The smallest captured batch size that holds ``batch`` rows."""
        return next(x for x in self.buckets if x >= batch)

    def can_run(self, sched: SchedulerOutput) -> bool:
        chunks = sched.chunks
        return (
            0 < len(chunks) <= self.buckets[-1]
            and all(c.num_tokens == 1 for c in chunks)
            and all(len(c.block_table) <= self.max_blocks_per_seq for c in chunks)
        )

    def run(self, sched: SchedulerOutput) -> torch.Tensor:
        """Logits [B, vocab] float32 of the decode batch (one row per chunk, in order)."""
        chunks = sched.chunks
        b = len(chunks)
        bucket = self.bucket_for(b)
        bs = self.block_size
        pad = bucket - b
        ids = [c.token_ids[0] for c in chunks] + [0] * pad
        pos = [c.start_pos for c in chunks]
        slots = [c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, pos, strict=True)]
        lens = [p + 1 for p in pos]
        # The pinned staging buffers are free again: the previous step's sampled ids were
        # read (a synchronisation) before this step was scheduled.
        self._host[:, :bucket] = torch.tensor(
            [ids, pos + [0] * pad, slots + [-1] * pad, lens + [0] * pad], dtype=torch.long
        )
        # A row is rewritten only when its table's stamp differs from the one it holds (a
        # new request in the row, a new block every block_size tokens, a swap or an import):
        # a 256 x 4k-token batch has 65k ids. Entries past a row's length are stale and
        # never read (the kernel stops at seq_len). No stamp: always rewritten.
        tables = self._host_tables_np
        for i, c in enumerate(chunks):
            if c.table_stamp is None or self._row_keys[i] != c.table_stamp:
                tables[i, : len(c.block_table)] = c.block_table
                self._row_keys[i] = c.table_stamp
        dev = self._dev
        dev[:, :bucket].copy_(self._host[:, :bucket], non_blocking=True)
        self.input_ids[:bucket].copy_(dev[0, :bucket])
        self.positions[:bucket].copy_(dev[1, :bucket])
        self.slots[:bucket].copy_(dev[2, :bucket])
        self.seq_lens[:bucket].copy_(dev[3, :bucket])
        self.tables[:b].copy_(self._host_tables[:b], non_blocking=True)
        self.graphs[bucket].replay()
        return self.logits[bucket][:b]
