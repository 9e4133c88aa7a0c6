"""The Llama family in one implementation: Llama 2/3, Mistral, Qwen2/2.5, Qwen3.

The differences are flags on ``ModelConfig``: ``attention_bias`` (Qwen2 q/k/v bias),
``qk_norm`` (Qwen3 per-head RMSNorm on q and k, before RoPE), ``sliding_window``
(Mistral), llama3 rope scaling, ``tie_word_embeddings``. Projections are fused:
``qkv_proj`` = [q; k; v] rows, ``gate_up_proj`` = [gate; up] rows (see loader.py).

The forward pass takes a flat batch of T tokens from many sequences (no padding):
``input_ids`` [T], ``positions`` [T], and per-layer paged K/V caches plus the
``AttentionMetadata`` describing which rows belong to which sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tandem import kernels
from tandem.attention import AttentionBackend, AttentionMetadata
from tandem.config import ModelConfig
from tandem.models.layers import RMSNorm, RotaryEmbedding, apply_rotary

Rotate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        h: torch.Tensor,  # [T, hidden]
        rotate: Rotate | tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        cfg = self.cfg
        T = h.shape[0]
        q, k, v = self.qkv_proj(h).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(T, cfg.num_heads, cfg.head_dim)
        k = k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if isinstance(rotate, tuple):  # (positions, inv_freq): the backend rotates (fused)
            out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, rope=rotate)
        else:
            q, k = rotate(q, k)
            out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.intermediate_size = cfg.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if kernels.enabled(gate_up):
            from tandem.kernels.elementwise import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, residual, rotate, kv_cache, meta, backend):
        """(h, residual) -> (h, residual): the residual stream is ``h + residual``, added
        inside the next norm (one fused kernel on CUDA; the same sums in the same order as
        ``h = h + attn(norm(h)); h = h + mlp(norm(h))``)."""
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, rotate, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: K, V [blocks, bs, Hkv, D]
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        rotate = self._rotate(positions, h, backend)
        residual = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, rotate, kv, meta, backend)
        h, _ = self.norm(h, residual)
        return h  # [T, hidden]

    def _rotate(
        self, positions: torch.Tensor, h: torch.Tensor, backend: AttentionBackend
    ) -> Rotate | tuple[torch.Tensor, torch.Tensor]:
        """How each layer rotates q and k: a function, or — for a backend that fuses the
        rotary into its K/V store, on the Triton path — ``(positions, inv_freq)`` for it."""
        if kernels.enabled(h) and backend.fuses_rope:
            return positions, self.rotary.inv_freq
        if kernels.enabled(h):
            from tandem.kernels.elementwise import rotary_

            inv_freq = self.rotary.inv_freq

            def fused(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                rotary_(q, k, positions, inv_freq)  # in place
                return q, k

            return fused
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        return lambda q, k: (apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] rows to sample -> [N, vocab] float32
        return self.lm_head(hidden).float()
