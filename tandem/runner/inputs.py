"""Turn a ``SchedulerOutput`` into the flat tensors one forward pass needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.attention import AttentionMetadata
from tandem.sched.output import SchedulerOutput


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: list[int]  # index into T of the last token of each sampling chunk
    sample_chunks: list[int]  # index into SchedulerOutput.chunks, aligned with sample_rows
    # (index into T, index into chunks) of each PLACEHOLDER_TOKEN: its id is on the device
    placeholders: list[tuple[int, int]]


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, device=device)`` without waiting for the device: a blocking
    host-to-device copy (what ``torch.tensor(..., device=cuda)`` does) first drains the
    stream, which would wait for the iteration in flight (async scheduling). From pageable
    memory the driver stages the bytes before returning, so the list may go at once."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def prepare_inputs(
    sched: SchedulerOutput, block_size: int, sliding_window: int | None, device: torch.device
) -> ModelInputs:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    seq_lens: list[int] = []
    sample_rows: list[int] = []
    sample_chunks: list[int] = []
    placeholders: list[tuple[int, int]] = []
    max_blocks = max(len(c.block_table) for c in sched.chunks)
    tables = torch.zeros((len(sched.chunks), max_blocks), dtype=torch.long)
    for i, chunk in enumerate(sched.chunks):
        n = chunk.num_tokens
        start = chunk.start_pos
        if chunk.token_ids[-1] < 0:  # a pending token is always a chunk's last
            placeholders += [(len(ids) + j, i) for j, t in enumerate(chunk.token_ids) if t < 0]
        ids.extend(chunk.token_ids)
        positions.extend(range(start, start + n))
        table = chunk.block_table
        slots.extend(
            table[p // block_size] * block_size + p % block_size for p in range(start, start + n)
        )
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
        query_start.append(query_start[-1] + n)
        seq_lens.append(start + n)
        if chunk.sample:
            sample_rows.append(query_start[-1] - 1)
            sample_chunks.append(i)
    meta = AttentionMetadata(
        query_start_loc=query_start,
        seq_lens=seq_lens,
        block_tables=tables if device.type == "cpu" else tables.to(device, non_blocking=True),
        slot_mapping=device_tensor(slots, torch.long, device),
        block_size=block_size,
        sliding_window=sliding_window,
    )
    return ModelInputs(
        input_ids=device_tensor(ids, torch.long, device),
        positions=device_tensor(positions, torch.long, device),
        meta=meta,
        sample_rows=sample_rows,
        sample_chunks=sample_chunks,
        placeholders=placeholders,
    )
