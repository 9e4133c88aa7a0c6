"""Paged decode attention in Triton: one query token per sequence, GQA, split-K.

Grid ``(num_decode_seqs, num_kv_heads, num_splits)``. A program owns one sequence, one KV
head and one *partition* of ``partition`` consecutive context positions; it loads the
``group`` query heads that share the KV head (padded to 16 rows for ``tl.dot``), walks its
partition in tiles of ``BLOCK_N`` tokens through the block table, and keeps an online
softmax. With one split it writes the normalised output; with more it writes the
unnormalised partial (acc, max, sum) and ``_reduce_kernel`` merges the partials of the
``cdiv(seq_len, partition)`` splits that had work. ``partition`` and the split count are
runtime arguments, not compile-time constants: eager batches pick them per iteration, and a
new constant would mean a new compilation (seconds) in the serving loop. A program whose partition starts past
the sequence returns at once, so the grid can be sized for the longest context the batch
may reach (CUDA graphs) at almost no cost. ``seq_len == 0`` (a padding row) writes zeros.

Invariants: every position ``< seq_len`` is attended exactly once (within the sliding
window when set); the query sits at position ``seq_len - 1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Measured on an H100 (bench/gpu_decode.py --sweep-attention): 128-token tiles, 4 warps,
# no software pipelining was best or within 2% of best at batch 32-256, contexts 1k-4k.
BLOCK_N = 128
NUM_WARPS = 4
NUM_STAGES = 1


# Per-iteration values are not specialised on (Triton would compile a variant for each
# "== 1" / "multiple of 16" class of them, seconds each, inside the serving loop).
@triton.jit(do_not_specialize=["window", "stride_bt", "partition", "num_splits"])
def _decode_kernel(
    Q, KC, VC, TABLES, SEQ_LENS, QSTART, SEQ_IDX, OUT, PART_ACC, PART_ML,
    scale_log2, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, partition, num_splits, ONE_SPLIT: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    s = tl.load(SEQ_IDX + i).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + s)
    qrow = tl.load(QSTART + s).to(tl.int64)
    start = split * partition
    heads = kvh * GROUP + tl.arange(0, GROUP_PAD)
    hmask = tl.arange(0, GROUP_PAD) < GROUP
    d = tl.arange(0, D_PAD)
    dmask = d < D
    hd = hmask[:, None] & dmask[None, :]
    if ONE_SPLIT and seq_len == 0:
        zero = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        optr = OUT + qrow * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(optr, zero.to(OUT.dtype.element_ty), mask=hd)
    if start < seq_len:
        end = tl.minimum(start + partition, seq_len)
        lo = start
        if HAS_WINDOW:
            lo = tl.maximum(start, ((seq_len - window) // BLOCK_N) * BLOCK_N)
        q = tl.load(
            Q + qrow * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=hmask[:, None], other=0.0,
        )  # fmt: skip
        m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        table = TABLES + s * stride_bt
        for t0 in range(lo, end, BLOCK_N):
            toks = t0 + tl.arange(0, BLOCK_N)
            valid = toks < end
            if HAS_WINDOW:
                valid = valid & (toks > seq_len - 1 - window)
            page = tl.load(table + toks // PAGE, mask=valid, other=0).to(tl.int64)
            off = page * stride_kb + (toks % PAGE) * stride_ks + kvh * stride_kh
            k = tl.load(
                KC + off[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0
            )
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(valid[None, :], qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            # A fully masked tile keeps m_new = -inf; shift by 0 then (exp2(-inf) = 0).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            v = tl.load(
                VC + off[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0
            )
            l_sum = l_sum * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if ONE_SPLIT:
            out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
            optr = OUT + qrow * stride_ot + heads[:, None] * stride_oh + d[None, :]
            tl.store(optr, out.to(OUT.dtype.element_ty), mask=hd)
        else:
            # partials: acc [S, Hq, num_splits, D], (m, l) [S, Hq, num_splits, 2]
            row = (s * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
            tl.store(PART_ACC + row[:, None] * D + d[None, :], acc, mask=hd)
            tl.store(PART_ML + row * 2, m, mask=hmask)
            tl.store(PART_ML + row * 2 + 1, l_sum, mask=hmask)


@triton.jit(do_not_specialize=["partition", "num_splits"])
def _reduce_kernel(
    PART_ACC, PART_ML, SEQ_LENS, QSTART, SEQ_IDX, OUT, stride_ot, stride_oh, NUM_HEADS,
    partition, num_splits,
    D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_TILE: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.load(SEQ_IDX + i).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + s)
    used = tl.cdiv(seq_len, partition)
    base = (s * NUM_HEADS + h) * num_splits
    # Pass 1: the largest running max of the splits that had work.
    m_max = tl.full([SPLITS_TILE], float("-inf"), dtype=tl.float32)
    for s0 in range(0, used, SPLITS_TILE):
        sp = s0 + tl.arange(0, SPLITS_TILE)
        m = tl.load(PART_ML + (base + sp) * 2, mask=sp < used, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    mx = tl.max(m_max, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    # Pass 2: rescale each split's sum and accumulator to that max.
    d = tl.arange(0, D_PAD)
    dmask = d < D
    total = tl.zeros([SPLITS_TILE], dtype=tl.float32)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for s0 in range(0, used, SPLITS_TILE):
        sp = s0 + tl.arange(0, SPLITS_TILE)
        smask = sp < used
        m = tl.load(PART_ML + (base + sp) * 2, mask=smask, other=float("-inf"))
        l_sum = tl.load(PART_ML + (base + sp) * 2 + 1, mask=smask, other=0.0)
        w = tl.where(smask, tl.exp2(m - mx), 0.0)
        part = tl.load(
            PART_ACC + (base + sp)[:, None] * D + d[None, :],
            mask=smask[:, None] & dmask[None, :], other=0.0,
        )  # fmt: skip
        total += l_sum * w
        acc += tl.sum(part * w[:, None], 0)
    denom = tl.sum(total, 0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    qrow = tl.load(QSTART + s).to(tl.int64)
    tl.store(OUT + qrow * stride_ot + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)


def choose_partition(max_seq_len: int, num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Tokens per split: enough programs to fill the GPU (~4 per SM), at least one tile,
    at most 2048 (a longer partition gains nothing and serialises more)."""
    want_programs = 4 * num_sms
    per = triton.cdiv(max(max_seq_len, 1) * num_seqs * num_kv_heads, want_programs)
    return max(BLOCK_N, min(2048, triton.next_power_of_2(per)))


def paged_decode(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, page, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int
    seq_lens: torch.Tensor,  # [S] int32, context incl. the new token
    query_start: torch.Tensor,  # [S+1] int32: row of q holding sequence s's query
    seq_idx: torch.Tensor,  # [n] int32: which sequences (rows of q) to run
    out: torch.Tensor,  # [T, Hq, D]; row s written for each s in seq_idx
    scale: float,
    partition: int,
    num_splits: int,
    sliding_window: int | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> None:
    """Attend the one query of each sequence in ``seq_idx``; writes its rows of ``out``."""
    n = seq_idx.shape[0]
    if n == 0:
        return
    _, page, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    ieee = q.dtype == torch.float32
    # Unused with one split, but never an alias of ``out``: Triton's interpreter copies
    # each argument to the host and back, so an aliased argument would write stale bytes
    # over the output (seen as NaNs in the CPU tests).
    part_acc = part_ml = q.new_empty(1, dtype=torch.float32)
    if num_splits > 1:
        S = seq_lens.shape[0]
        part_acc = torch.empty(
            (S, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_ml = torch.empty((S, num_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    _decode_kernel[(n, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, seq_idx, out, part_acc, part_ml,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        BLOCK_N=block_n, partition=partition, num_splits=num_splits, ONE_SPLIT=num_splits == 1,
        HAS_WINDOW=sliding_window is not None, IEEE=ieee, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_kernel[(n, num_heads)](
            part_acc, part_ml, seq_lens, query_start, seq_idx, out, out.stride(0), out.stride(1), num_heads,
            partition, num_splits,
            D=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), SPLITS_TILE=16,
            num_warps=4,
        )  # fmt: skip
