"""CUDA graphs for decode batches: one captured forward pass per batch-size bucket.

A decode-only iteration of B sequences (every chunk is one token) replays the graph of the
smallest bucket >= B. Its per-row int32 inputs are rows of one staging buffer ``stage``
[6, max_batch] on the device (``StageRows``: ids, positions, slots, sequence lengths, the
id source, the sampled ids), filled by one host-to-device copy of the first five rows; the
block tables are a second copy. Rows past B are padding (slot -1: no K/V store; sequence
length 0: attention writes zeros).

Inside the graph: the input ids are gathered from ``stage`` by the SRC row — a row's own
staged id, or the id the previous step sampled into the SAMPLED row (async scheduling: a
token whose id the host has not read yet) — then the forward pass, the LM head, and the
argmax of every row into the SAMPLED row. ``run`` returns the LM head's logits (model
dtype) for the rows that need real sampling; a greedy batch needs nothing else.

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
from tandem.runner.stage import StageRows
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
        stage: torch.Tensor,  # [StageRows.COUNT, >= max_batch] int32 on the device
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
        assert stage.dtype == torch.int32 and stage.shape[0] == StageRows.COUNT
        self.stage = stage
        self.width = stage.shape[1]
        self.tables = torch.zeros((n, self.max_blocks_per_seq), **i64)
        self.query_start = torch.arange(n + 1, **i32)
        self.seq_idx = torch.arange(n, **i32)
        self.no_prefill = torch.zeros(0, **i32)
        self._host = torch.zeros((StageRows.STAGED, self.width), dtype=torch.int32).pin_memory()
        self._host_np = self._host.numpy()
        self._host_tables = torch.zeros((n, self.max_blocks_per_seq), dtype=torch.long).pin_memory()
        self._host_tables_np = self._host_tables.numpy()
        self._row_keys: list[int | None] = [None] * n
        # Recorded after each step's host-to-device copies: the pinned buffers above are
        # rewritten only once it has fired (with async scheduling the previous step's
        # copies may still be queued behind the step before it).
        self._copied: torch.cuda.Event | None = None
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
            slot_mapping=self.stage[StageRows.SLOT, :b],
            block_size=self.block_size,
            sliding_window=self.sliding_window,
            device=DeviceMeta(
                seq_lens=self.stage[StageRows.LEN, :b],
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
        stage = self.stage
        ids = stage.view(-1).index_select(0, stage[StageRows.SRC, :b])  # [b] int32
        hidden = self.model(
            ids, stage[StageRows.POS, :b], self.kv_layers, self._meta(b), self.backend
        )
        logits = self.model.lm_head(hidden)  # [b, vocab], model dtype
        # argmax of the model-dtype logits = argmax of their exact float32 upcast
        stage[StageRows.SAMPLED, :b].copy_(logits.argmax(dim=-1))
        return logits

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._stage_padding(self.buckets[-1], 0)  # valid inputs for the warm-up passes
            self.stage[: StageRows.STAGED].copy_(self._host)
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

    def _stage_padding(self, end: int, start: int) -> None:
        """Host rows ``start:end`` as padding: id 0 (its own), slot -1, length 0."""
        h = self._host_np
        h[StageRows.IDS, start:end] = 0
        h[StageRows.POS, start:end] = 0
        h[StageRows.SLOT, start:end] = -1
        h[StageRows.LEN, start:end] = 0
        h[StageRows.SRC, start:end] = range(StageRows.IDS * self.width + start,
                                            StageRows.IDS * self.width + end)  # fmt: skip

    def run(self, sched: SchedulerOutput, src: list[int | None]) -> torch.Tensor:
        """Replay the decode batch (one row per chunk, in order). ``src[i]``: the SAMPLED
        row holding chunk i's input id (a pending token), or None (its id is staged).
        Returns the logits [B, vocab] (model dtype); the argmax of every row is in the
        SAMPLED row of ``stage`` when the replay has run."""
        chunks = sched.chunks
        b = len(chunks)
        bucket = self.bucket_for(b)
        bs = self.block_size
        w = self.width
        ids = [c.token_ids[0] for c in chunks]
        pos = [c.start_pos for c in chunks]
        slots = [c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, pos, strict=True)]
        own = StageRows.IDS * w
        picked = StageRows.SAMPLED * w
        srcs = [own + i if s is None else picked + s for i, s in enumerate(src)]
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have read the pinned buffers
        h = self._host_np
        h[StageRows.IDS, :b] = [max(t, 0) for t in ids]
        h[StageRows.POS, :b] = pos
        h[StageRows.SLOT, :b] = slots
        h[StageRows.LEN, :b] = [p + 1 for p in pos]
        h[StageRows.SRC, :b] = srcs
        self._stage_padding(bucket, b)
        # A row is rewritten only when its table's stamp differs from the one it holds (a
        # new request in the row, a new block every block_size tokens, a swap or an import):
        # a 256 x 4k-token batch has 65k ids. Entries past a row's length are stale and
        # never read (the kernel stops at seq_len). No stamp: always rewritten.
        tables = self._host_tables_np
        for i, c in enumerate(chunks):
            if c.table_stamp is None or self._row_keys[i] != c.table_stamp:
                tables[i, : len(c.block_table)] = c.block_table
                self._row_keys[i] = c.table_stamp
        self.stage[: StageRows.STAGED].copy_(self._host, non_blocking=True)
        self.tables[:b].copy_(self._host_tables[:b], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()
        self.graphs[bucket].replay()
        return self.logits[bucket][:b]
