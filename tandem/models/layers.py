"""Building blocks shared by the Llama family: RMSNorm and rotary embeddings.

Both follow transformers' arithmetic order (normalise in float32, cast back; cos/sin
computed in float32 from ``position * inv_freq``) so that float32 outputs agree with
the reference to rounding, which keeps greedy decoding token-identical. On CUDA the same
arithmetic runs as fused Triton kernels (``tandem.kernels.elementwise``); these torch
versions are their references and the CPU path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tandem import kernels
from tandem.config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``s = x + residual``, returns ``(norm(s), s)``."""
        if kernels.enabled(x):
            from tandem.kernels.elementwise import rms_norm

            flat = x.reshape(-1, x.shape[-1])
            res = residual.reshape(-1, x.shape[-1]) if residual is not None else None
            out, new_res = rms_norm(flat, self.weight, self.eps, res)
            out = out.view(x.shape)
            return out if residual is None else (out, new_res.view(x.shape))
        if residual is None:
            return self._norm(x)
        s = x + residual
        return self._norm(s), s

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, with llama3 scaling applied if set."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`, short ones kept,
    # and the band between them interpolated smoothly (Llama 3.1 recipe).
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate_half), applied per token by position."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, rope), persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] int64 -> cos, sin: [T, 1, head_dim] in `dtype`
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :].to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos/sin: [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
