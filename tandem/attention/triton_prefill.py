"""Chunked-prefill attention over paged KV in Triton (flash-attention style).

Grid ``(num_prefill_seqs, num_heads, cdiv(max_q_len, BLOCK_M))``. Sequence s has q_len new
query rows at positions ``seq_len - q_len .. seq_len - 1`` (rows
``query_start[s] ..``); their K/V are already in the paged cache, behind the cached prefix.
A program takes BLOCK_M query rows of one head and walks the keys through the block
table: full over the prefix and the tiles strictly below its first query (no mask), then
the diagonal tiles with the causal mask (key pos <= query pos) and, with a sliding
window W, key pos > query pos - W. Online softmax in float32 (exp2). A program whose rows
start past q_len returns at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.attention.triton_decode import LOG2E


@triton.jit
def _tile(
    q, acc, m, l_sum, KC, VC, table, t0, qpos, hi, window, kvh,
    stride_kb, stride_ks, stride_kh, scale_log2,
    D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    d = tl.arange(0, D_PAD)
    dmask = d < D
    toks = t0 + tl.arange(0, BLOCK_N)
    tvalid = toks < hi
    page = tl.load(table + toks // PAGE, mask=tvalid, other=0).to(tl.int64)
    off = page * stride_kb + (toks % PAGE) * stride_ks + kvh * stride_kh
    k = tl.load(KC + off[:, None] + d[None, :], mask=tvalid[:, None] & dmask[None, :], other=0.0)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = qk * scale_log2
    if MASKED:
        keep = tvalid[None, :] & (toks[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            keep = keep & (toks[None, :] > qpos[:, None] - window)
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    v = tl.load(VC + off[:, None] + d[None, :], mask=tvalid[:, None] & dmask[None, :], other=0.0)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_sum


@triton.jit(do_not_specialize=["window", "stride_bt"])
def _prefill_kernel(
    Q, KC, VC, TABLES, SEQ_LENS, QSTART, SEQ_IDX, OUT,
    scale_log2, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    s = tl.load(SEQ_IDX + tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1)
    mt = tl.program_id(2)
    q_start = tl.load(QSTART + s)
    q_len = tl.load(QSTART + s + 1) - q_start
    if mt * BLOCK_M < q_len:
        seq_len = tl.load(SEQ_LENS + s)
        prefix = seq_len - q_len
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        qpos = prefix + rows
        d = tl.arange(0, D_PAD)
        rd = rmask[:, None] & (d < D)[None, :]
        qrows = (q_start + rows).to(tl.int64)
        q = tl.load(
            Q + qrows[:, None] * stride_qt + h * stride_qh + d[None, :],
            mask=rd, other=0.0,
        )  # fmt: skip
        kvh = h // GROUP
        table = TABLES + s * stride_bt
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        first_q = prefix + mt * BLOCK_M
        hi = tl.minimum(seq_len, first_q + BLOCK_M)  # keys past the last row's position: none
        if HAS_WINDOW:
            lo = tl.maximum(0, ((first_q - window + 1) // BLOCK_N) * BLOCK_N)
            full_end = lo  # the window needs the mask everywhere
        else:
            lo = 0
            full_end = (first_q // BLOCK_N) * BLOCK_N  # every key < first_q: unmasked
        for t0 in range(lo, full_end, BLOCK_N):
            acc, m, l_sum = _tile(
                q, acc, m, l_sum, KC, VC, table, t0, qpos, hi, window, kvh,
                stride_kb, stride_ks, stride_kh, scale_log2,
                D, D_PAD, PAGE, BLOCK_N, False, HAS_WINDOW, IEEE,
            )  # fmt: skip
        for t0 in range(full_end, hi, BLOCK_N):
            acc, m, l_sum = _tile(
                q, acc, m, l_sum, KC, VC, table, t0, qpos, hi, window, kvh,
                stride_kb, stride_ks, stride_kh, scale_log2,
                D, D_PAD, PAGE, BLOCK_N, True, HAS_WINDOW, IEEE,
            )  # fmt: skip
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(
            OUT + qrows[:, None] * stride_ot + h * stride_oh + d[None, :],
            out.to(OUT.dtype.element_ty), mask=rd,
        )  # fmt: skip


def paged_prefill(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, page, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    seq_lens: torch.Tensor,  # [S] int32
    query_start: torch.Tensor,  # [S+1] int32
    seq_idx: torch.Tensor,  # [n] int32: the sequences with q_len > 1
    max_q_len: int,
    out: torch.Tensor,  # [T, Hq, D]
    scale: float,
    sliding_window: int | None = None,
) -> None:
    n = seq_idx.shape[0]
    if n == 0:
        return
    _, page, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    ieee = q.dtype == torch.float32
    block_m = 64 if ieee or max_q_len <= 64 else 128
    block_n = 32 if ieee else 64
    _prefill_kernel[(n, num_heads, triton.cdiv(max_q_len, block_m))](
        q, k_cache, v_cache, block_tables, seq_lens, query_start, seq_idx, out,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, D=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=sliding_window is not None, IEEE=ieee,
        num_warps=8 if block_m == 128 else 4, num_stages=2,
    )  # fmt: skip
