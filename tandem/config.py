"""Frozen configuration dataclasses, validated on construction (pure, no torch).

- ``ModelConfig``: the architecture, parsed from a Hugging Face ``config.json``.
- ``CacheConfig``: paged KV cache geometry (block size, blocks per tier).
- ``SchedulerConfig``: batch limits, token budget, policy, preemption mode.
- ``EngineConfig``: the above plus model path, device, dtype and seed.

A bad value raises ``ValueError`` naming the field, so CLIs and HTTP handlers can turn it
into a clear error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architectures served by tandem/models/llama.py (one implementation, flags per family).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

DTYPES = ("float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. ``rope_type`` is ``default`` or ``llama3``."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _require(
            self.rope_type in ("default", "llama3"),
            f"unsupported rope_type {self.rope_type!r} (supported: default, llama3)",
        )
        _require(self.theta > 0, "rope theta must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sliding_window: int | None = None  # Mistral: keys with pos > q_pos - window
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(
            self.architecture in SUPPORTED_ARCHITECTURES,
            f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        _require(
            self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
        )
        _require(
            self.sliding_window is None or self.sliding_window >= 1, "sliding_window must be >= 1"
        )

    @property
    def o_proj_bias(self) -> bool:
        """HF puts ``attention_bias`` on o_proj too, except Qwen2 (q/k/v only)."""
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (embeddings, layers, norms, LM head unless tied)."""
        h, i = self.hidden_size, self.intermediate_size
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or []
        _require(bool(archs), "config.json has no 'architectures' entry")
        arch = archs[0]
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        # transformers >= 5 keeps rope settings in rope_parameters; older files use
        # rope_theta + rope_scaling at the top level.
        rope_params = dict(d.get("rope_parameters") or {})
        scaling = dict(d.get("rope_scaling") or {})
        merged = {**scaling, **rope_params}
        theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        rope = RopeConfig(
            theta=float(theta),
            rope_type=str(rope_type),
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                merged.get("original_max_position_embeddings", 8192)
            ),
        )
        sliding = d.get("sliding_window")
        if arch.startswith("Qwen") and not d.get("use_sliding_window", False):
            sliding = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            rope=rope,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} is not a model folder: config.json not found")
        cfg = cls.from_hf_dict(json.loads(path.read_text()))
        # generation_config.json may list more EOS ids (Llama 3 instruct does).
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            if gen_eos is not None:
                extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
                ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *(int(e) for e in extra)]))
                cfg = _replace(cfg, eos_token_ids=ids)
        return cfg


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def kv_compat_hash(model: ModelConfig, dtype: str, block_size: int) -> str:
    """Hash of everything that must match for KV blocks to move between two engines."""
    key = json.dumps(
        [
            model.architecture,
            model.num_layers,
            model.num_kv_heads,
            model.head_dim,
            model.hidden_size,
            model.vocab_size,
            dtype,
            block_size,
        ],
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def kv_cache_salt(model: ModelConfig, dtype: str, block_size: int, model_name: str) -> str:
    """The salt of prefix-cache block names (kvcache/prefix.py): the KV layout and the
    model's name (the last part of its path, so that two machines holding the same model
    at different paths still agree). Engines whose salts are equal share block names."""
    name = model_name.rstrip("/").rsplit("/", 1)[-1]
    return f"{kv_compat_hash(model, dtype, block_size)}:{name}"


def kv_block_bytes(model: ModelConfig, dtype: str, block_size: int, int8: bool = False) -> int:
    """Bytes of one KV block (K and V of every layer): in ``dtype``, or as int8 plus one
    float32 absmax scale per layer, K/V and KV head (the host tier with ``swap_int8``)."""
    elements = model.num_layers * 2 * block_size * model.num_kv_heads * model.head_dim
    if int8:
        return elements + model.num_layers * 2 * model.num_kv_heads * 4
    return elements * (4 if dtype == "float32" else 2)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry.

    ``num_blocks`` is the device tier; ``num_host_blocks`` the host tier (pinned memory
    on CUDA) that swap preemption and proactive offload use (0 = no host tier:
    preemption recomputes). ``swap_int8`` stores swapped blocks as int8 with a per-head,
    per-block absmax scale (ALISE): lossy, so off by default.
    ``enable_prefix_caching``: full blocks are named by content and reused across
    requests (kvcache/prefix.py); a new request computes only past its longest cached
    prefix.
    """

    block_size: int = 16
    num_blocks: int = 1024
    num_host_blocks: int = 0
    swap_int8: bool = False
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(
            self.block_size >= 1 and (self.block_size & (self.block_size - 1)) == 0,
            "block_size must be a power of two",
        )
        _require(self.num_blocks >= 1, "num_blocks (--kv-blocks) must be >= 1")
        _require(self.num_host_blocks >= 0, "num_host_blocks (--host-kv-blocks) must be >= 0")


PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-iteration limits (Sarathi-Serve token budget) and policy choice.

    ``max_num_batched_tokens`` is the token budget of one iteration: decodes count one
    token each, prefill chunks fill the rest. ``policy`` names an entry of
    ``tandem.sched.policy.POLICIES``.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "mlfq"
    preemption_mode: str = "recompute"
    max_model_len: int | None = None
    # Proactive offload (FastServe), active only with a host tier: keep this fraction of
    # the device blocks free by swapping out idle low-priority requests, and prefetch
    # swapped requests only into room above it. 0 = swap only as preemption.
    swap_watermark: float = 0.05
    # Iterations a request swapped in is safe from proactive swap-out (no ping-pong).
    swap_hysteresis_iters: int = 4
    # mlfq / alise knobs (see tandem/sched/mlfq.py, alise.py). q0 None = from the cost model.
    mlfq_q0: float | None = None
    mlfq_levels: int = 8
    skip_join: bool = True
    starvation_limit: float = 60.0
    # After this many recompute preemptions a request is protected from further ones by its
    # own priority class (anti-livelock; see Scheduler._order_key).
    max_recompute_evictions: int = 2

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _require(
            self.max_num_batched_tokens >= 1, "max_num_batched_tokens (token budget) must be >= 1"
        )
        _require(
            self.preemption_mode in PREEMPTION_MODES,
            f"preemption_mode must be one of {PREEMPTION_MODES}",
        )
        _require(
            self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1"
        )
        _require(0.0 <= self.swap_watermark < 1.0, "swap_watermark must be in [0, 1) (a fraction)")
        _require(self.swap_hysteresis_iters >= 0, "swap_hysteresis_iters must be >= 0")
        _require(self.max_recompute_evictions >= 0, "max_recompute_evictions must be >= 0")
        _require(self.mlfq_q0 is None or self.mlfq_q0 > 0, "mlfq_q0 must be > 0 seconds")
        _require(self.mlfq_levels >= 1, "mlfq_levels must be >= 1")
        _require(self.starvation_limit > 0, "starvation_limit must be > 0 seconds")
        from tandem.sched.policy import POLICIES

        _require(
            self.policy in POLICIES,
            f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}",
        )


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # JSON file of CostModel coefficients; None = profile at start-up when the policy
    # needs one (mlfq, alise).
    cost_model_path: str | None = None
    # Attention backend: "auto" = triton on CUDA when it imports, else torch.
    attention: str = "auto"
    # Capture decode batches in CUDA graphs (CUDA with the triton backend only).
    cuda_graphs: bool = True
    # Schedule iteration N+1 while N runs on the device (LLMEngine). build_engine_config
    # turns it on for CUDA unless asked not to (--no-async-scheduling).
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        _require(
            self.attention in ATTENTION_BACKENDS,
            f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.attention!r}",
        )
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"device must be cpu or cuda[:N], got {self.device!r}",
        )
        _require(
            self.scheduler.enable_chunked_prefill or self.scheduler.max_num_batched_tokens >= 1,
            "token budget must be >= 1",
        )
