"""Fused elementwise kernels: (residual add +) RMSNorm, neox rotary in place, SiLU-and-mul,
the store of new K/V into the paged cache, and rotary fused with that store.

Arithmetic contracts (the torch references in ``tandem/models/layers.py`` and
``tandem/attention/torch_ref.py``):
- ``rms_norm``: ``s = x + residual`` in the input dtype (when a residual is given; ``s``
  is also returned as the new residual); ``y = weight * (s_f32 * rsqrt(mean(s_f32^2) +
  eps)).to(dtype)``.
- ``rotary_``: for each token, ``f = pos * inv_freq`` in float32; ``x1' = x1 cos f -
  x2 sin f``, ``x2' = x2 cos f + x1 sin f`` on the two halves of every head (neox), in
  float32, written back in place.
- ``silu_and_mul``: ``x = [gate | up]`` rows; ``silu(gate) * up`` in float32, stored in
  dtype.
- ``store_kv``: ``k_cache.flat[slot[t]] = k[t]`` (and v); a slot < 0 is skipped (padding
  rows of a CUDA-graph batch).
- ``rotary_store_kv``: ``rotary_`` on q (in place) and k, then ``store_kv`` of the rotated
  k and of v, in one launch; ``k`` itself is left as it was (attention reads K from the
  cache). Same arithmetic as the two kernels it replaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    X, R, W, OUT, RES_OUT,
    stride_x, stride_r, stride_o, stride_ro,
    N, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x + r).to(r.dtype)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * stride_o + cols, (w * y).to(x.dtype), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [T, N] -> (normed [T, N], new residual [T, N] or None)."""
    x = x.contiguous() if x.stride(-1) != 1 else x
    T, N = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else None
    if T == 0:
        return out, res_out
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(T,)](
        x, residual if residual is not None else x, weight, out,
        res_out if res_out is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        N, eps, HAS_RES=residual is not None, BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    return out, res_out


@triton.jit
def _cos_sin(POS, INV_FREQ, t, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """cos and sin of token ``t``'s rotary angles, [1, HALF_PAD] float32 (0 past HALF)."""
    pos = tl.load(POS + t).to(tl.float32)
    i = tl.arange(0, HALF_PAD)
    f = pos * tl.load(INV_FREQ + i, mask=i < HALF, other=0.0)
    return tl.cos(f)[None, :], tl.sin(f)[None, :]


@triton.jit
def _rotate(src, dst, mask, cos, sin, HALF: tl.constexpr):
    """Rotate half-split rows: ``src``/``dst`` point at the first halves [heads, HALF_PAD],
    the second halves are ``HALF`` further. ``dst`` may be ``src`` (in place)."""
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(dst + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, POS, INV_FREQ,
    stride_qt, stride_qh, stride_kt, stride_kh,
    HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(POS, INV_FREQ, t, HALF, HALF_PAD)
    i = tl.arange(0, HALF_PAD)
    imask = (i < HALF)[None, :]
    hq = tl.arange(0, HQ_PAD)[:, None]
    qp = Q + t * stride_qt + hq * stride_qh + i[None, :]
    _rotate(qp, qp, (hq < HQ) & imask, cos, sin, HALF)
    hk = tl.arange(0, HK_PAD)[:, None]
    kp = K + t * stride_kt + hk * stride_kh + i[None, :]
    _rotate(kp, kp, (hk < HK) & imask, cos, sin, HALF)


def rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    """In place. q: [T, Hq, D], k: [T, Hkv, D] (last dim contiguous); positions [T];
    inv_freq [D/2] float32."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    _rotary_kernel[(T,)](
        q, k, positions, inv_freq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        HQ=HQ, HK=HK, HQ_PAD=triton.next_power_of_2(HQ), HK_PAD=triton.next_power_of_2(HK),
        HALF=D // 2, HALF_PAD=triton.next_power_of_2(D // 2), num_warps=4,
    )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(X, OUT, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * up.to(tl.float32)
    tl.store(OUT + row * stride_o + cols, y.to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2N] = [gate | up] -> [T, N]."""
    T, two_n = x.shape
    N = two_n // 2
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block = 1024
    _silu_and_mul_kernel[(T, triton.cdiv(N, block))](
        x, out, x.stride(0), out.stride(0), N, BLOCK=block, num_warps=4
    )
    return out


@triton.jit
def _store_kv_kernel(
    K, V, KC, VC, SLOTS, stride_k, stride_v, stride_slot, N: tl.constexpr, BLOCK: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        tl.store(
            KC + slot * stride_slot + cols, tl.load(K + t * stride_k + cols, mask=mask), mask=mask
        )
        tl.store(
            VC + slot * stride_slot + cols, tl.load(V + t * stride_v + cols, mask=mask), mask=mask
        )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:  # fmt: skip
    """k, v: [T, Hkv, D] (rows contiguous); caches [num_blocks, block_size, Hkv, D]."""
    T, HK, D = k.shape
    if T == 0:
        return
    n = HK * D
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), n,
        N=n, BLOCK=triton.next_power_of_2(n), num_warps=4,
    )  # fmt: skip


@triton.jit
def _rotary_store_kv_kernel(
    Q, K, V, KC, VC, POS, SLOTS, INV_FREQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_slot,
    HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(POS, INV_FREQ, t, HALF, HALF_PAD)
    i = tl.arange(0, HALF_PAD)
    imask = (i < HALF)[None, :]
    hq = tl.arange(0, HQ_PAD)[:, None]
    qp = Q + t * stride_qt + hq * stride_qh + i[None, :]
    _rotate(qp, qp, (hq < HQ) & imask, cos, sin, HALF)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot >= 0:
        hk = tl.arange(0, HK_PAD)[:, None]
        km = (hk < HK) & imask
        kp = K + t * stride_kt + hk * stride_kh + i[None, :]
        # The cache row of one slot is [Hkv, D] contiguous (head stride = 2 * HALF).
        cp = KC + slot * stride_slot + hk * (2 * HALF) + i[None, :]
        _rotate(kp, cp, km, cos, sin, HALF)
        vp = V + t * stride_vt + hk * stride_vh + i[None, :]
        vc = VC + slot * stride_slot + hk * (2 * HALF) + i[None, :]
        tl.store(vc, tl.load(vp, mask=km), mask=km)
        tl.store(vc + HALF, tl.load(vp + HALF, mask=km), mask=km)


def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:  # fmt: skip
    """q: [T, Hq, D] rotated in place; rotated k and v: [T, Hkv, D] stored at
    ``slot_mapping`` (< 0: skipped) in caches [num_blocks, block_size, Hkv, D] (contiguous);
    positions [T]; inv_freq [D/2] float32. Last dims contiguous."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    if T == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and D % 2 == 0
    _rotary_store_kv_kernel[(T,)](
        q, k, v, k_cache, v_cache, positions, slot_mapping, inv_freq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HK * D,
        HQ=HQ, HK=HK, HQ_PAD=triton.next_power_of_2(HQ), HK_PAD=triton.next_power_of_2(HK),
        HALF=D // 2, HALF_PAD=triton.next_power_of_2(D // 2), num_warps=4,
    )  # fmt: skip
