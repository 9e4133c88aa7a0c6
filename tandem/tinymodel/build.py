"""Build the tiny random-weight model folders used by tests and by ``tandem serve``'s default.

Contract of ``make_tiny_model(out_dir, arch, seed)``:
- Writes a complete Hugging Face model folder: config.json, model.safetensors,
  generation_config.json, tokenizer.json, tokenizer_config.json (ChatML ``chat_template``),
  special_tokens_map.json. ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it offline.
- Pure function of ``(arch, seed)``: the same pair gives byte-identical model.safetensors and
  tokenizer files; a different seed gives different weights (the tokenizer never depends on
  the seed).
- Every parameter is drawn by this module (see ``_init_weights``), not by transformers, so the
  weights do not change when transformers changes its default initialisation.

Why a custom initialisation: tests compare the engine's greedy tokens with transformers'
greedy tokens in float32. With the usual N(0, 0.02) init the logits span a fraction of a unit
and top-two gaps of 1e-5 are common, so parity tests flip on a harmless reordering of sums.
The chosen init (all from one generator, see ``_init_weights``):
- embeddings / lm_head rows N(0, 1); every projection N(0, gain²/fan_in), so activations keep
  unit scale through the residual stream and float32 error stays ~1e-7 relative;
- q/k gain 1: attention scores have O(1) spread, so attention mixes the whole context and
  RoPE positions matter, while no softmax is saturated (saturated near-ties amplify noise);
- MLP gain 2 and RMSNorm weights uniform in [0.6, 1.4]: richer dynamics, so greedy
  continuations wander over many tokens instead of settling into short loops;
- final norm weights scaled by 20/sqrt(hidden) with random signs: logits have std ~20, so
  top-1 minus top-2 gaps are typically ~4 and rarely below 1e-2; the signs stop tied models
  from favouring the input token itself (its embedding is still in the residual stream);
- Qwen2 q/k/v biases N(0, 0.3²); special-token output rows scaled by 0.1, so greedy decoding
  (almost) never emits </s> or <|im_end|> by itself.
``tandem.tinymodel.measure`` reports the margins; float32-vs-float64 error on the gap is
~1e-5..1e-4 absolute, a few hundred times below the smallest gap seen over 1024 steps.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tandem.tinymodel import ARCHS, DEFAULT_ARCH, DEFAULT_SEED, default_model_path
from tandem.tinymodel import tokenizer as tk
from tandem.tinymodel.files import make_readable

_COMMON: dict[str, Any] = {
    "vocab_size": tk.VOCAB_SIZE,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 352,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "bos_token_id": tk.BOS_ID,
    "eos_token_id": tk.EOS_ID,
    "pad_token_id": tk.PAD_ID,
}

_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}

# Per-arch fields; "_rope_theta" and "_rope_scaling" are legacy keys this module passes on
# (transformers 5 folds them into rope_parameters) and writes back at top level of config.json.
_ARCH_FIELDS: dict[str, dict[str, Any]] = {
    "llama": {
        "_class": "LlamaForCausalLM",
        "_rope_theta": 500000.0,
        "_rope_scaling": _LLAMA3_SCALING,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        "_class": "MistralForCausalLM",
        "_rope_theta": 10000.0,
        "sliding_window": 128,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "_class": "Qwen2ForCausalLM",
        "_rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
    },
    "qwen3": {
        "_class": "Qwen3ForCausalLM",
        "_rope_theta": 1000000.0,
        "head_dim": 48,  # deliberately != hidden_size / num_attention_heads (= 32)
        "tie_word_embeddings": True,
        "attention_bias": False,
        "use_sliding_window": False,
    },
}

# Initialisation gains (see module docstring). A linear layer's weight is N(0, gain²/fan_in),
# so with unit-RMS inputs its outputs have RMS ~gain.
_QK_GAIN = 1.0  # attention score spread ~ O(1) before softmax
_VO_GAIN = 1.0
_MLP_GAIN = 2.0  # a strong MLP keeps greedy continuations from settling into short loops
_BIAS_STD = 0.3  # Qwen2 q/k/v biases: clearly non-zero, smaller than the projected signal
_NORM_LO, _NORM_HI = 0.6, 1.4  # RMSNorm weights, uniform: not all 1, never near 0
_EMBED_STD = 1.0
_LOGIT_STD = 20.0  # final norm scale chosen so that logits have std ~ _LOGIT_STD
_SPECIAL_ROW_SCALE = 0.1  # special tokens' output rows: they (almost) never win greedily


def _safe_kwargs() -> dict[str, Any]:
    # transformers 4 needs safe_serialization=True; transformers 5 always writes safetensors
    # and no longer takes the argument.
    from transformers import PreTrainedModel

    params = inspect.signature(PreTrainedModel.save_pretrained).parameters
    return {"safe_serialization": True} if "safe_serialization" in params else {}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; valid choices: {', '.join(ARCHS)}")


def config_dict(arch: str) -> dict[str, Any]:
    """Keyword arguments for the transformers config class of ``arch`` (legacy rope keys)."""
    _check_arch(arch)
    fields = {k: v for k, v in _ARCH_FIELDS[arch].items() if not k.startswith("_")}
    out: dict[str, Any] = {**_COMMON, **fields, "rope_theta": _ARCH_FIELDS[arch]["_rope_theta"]}
    if "_rope_scaling" in _ARCH_FIELDS[arch]:
        out["rope_scaling"] = dict(_ARCH_FIELDS[arch]["_rope_scaling"])
    return out


def build_model(arch: str, seed: int) -> torch.nn.Module:
    """Instantiate the float32 transformers model for ``arch`` and initialise it from ``seed``."""
    import transformers

    _check_arch(arch)
    cls = getattr(transformers, _ARCH_FIELDS[arch]["_class"])
    config = cls.config_class(**config_dict(arch))
    with torch.random.fork_rng(devices=[]):  # transformers' own init must not touch callers' RNG
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32)
    _init_weights(model, seed)
    return model.eval()


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a ``torch.Generator`` seeded by ``seed``.

    Parameters are visited in ``named_parameters()`` order (tied weights once), which is fixed
    by the architecture, so the result is a pure function of (arch, seed).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-2]  # "q_proj", "embed_tokens", "lm_head", "norm", ...
            if leaf in ("embed_tokens", "lm_head"):
                w = torch.randn(p.shape, generator=gen) * _EMBED_STD
                if leaf == "lm_head" or model.config.tie_word_embeddings:
                    w[: len(tk.SPECIAL_TOKENS)] *= _SPECIAL_ROW_SCALE
            elif name.endswith("norm.weight"):
                w = torch.empty(p.shape).uniform_(_NORM_LO, _NORM_HI, generator=gen)
                if name == "model.norm.weight":
                    # Random signs: with tied embeddings, the residual still carries the input
                    # token's own embedding e_t, and logits E·h would favour t itself (greedy
                    # output repeats one token). Signs make e_t·(w ⊙ e_t) zero-mean.
                    signs = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                    w *= signs * (_LOGIT_STD / (_EMBED_STD * math.sqrt(hidden)))
            elif name.endswith("proj.bias"):
                w = torch.randn(p.shape, generator=gen) * _BIAS_STD
            elif name.endswith("proj.weight"):
                gain = _gain_for(leaf)
                w = torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[1]))
            else:
                raise RuntimeError(f"tiny model: no init rule for parameter {name}")
            p.copy_(w.to(p.dtype))


def _gain_for(leaf: str) -> float:
    if leaf in ("q_proj", "k_proj"):
        return _QK_GAIN
    if leaf in ("v_proj", "o_proj"):
        return _VO_GAIN
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        return _MLP_GAIN
    raise RuntimeError(f"tiny model: no gain for projection {leaf}")


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write the tiny ``arch`` model with weights from ``seed`` into ``out_dir``; return it.

    ``out_dir`` is created if missing; files already there with the same names are replaced.
    The folder ends 0755 and its files 0644 whatever the umask (``files.make_readable``).
    Raises ValueError for an unknown ``arch``.
    """
    _check_arch(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, seed)
    with quiet_progress():
        model.save_pretrained(out, **_safe_kwargs())
    _patch_config(out / "config.json", arch)
    tk.write_json(out / "generation_config.json", _generation_config())
    tk.save_tokenizer(tk.train_tokenizer(), out)
    make_readable(out)
    return out


def default_model_dir() -> Path:
    """The bundled default model (tiny llama, seed 0) under ``env.cache_dir()/models``.

    Built on first use into a temporary folder beside the target and renamed into place, so a
    process never sees a half-written folder; when several processes race, one rename wins and
    the others discard their copies. Later calls return the existing folder at once.
    """
    target = default_model_path()
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"building the bundled tiny model into {_home_short(target)} ... (first run only)",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_tiny_model(tmp, DEFAULT_ARCH, DEFAULT_SEED)  # 0755, like the shared cache needs
        os.rename(tmp, target)
        print(f"built it in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    except OSError:
        if not target.is_dir():  # a lost race is fine; anything else is an error
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _home_short(path: Path) -> str:
    """``path`` with the home folder written ``~`` (as users know the cache)."""
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def _patch_config(path: Path, arch: str) -> None:
    """Add legacy top-level keys (older readers) next to transformers 5's ``rope_parameters``."""
    cfg = json.loads(path.read_text("utf-8"))
    cfg["rope_theta"] = _ARCH_FIELDS[arch]["_rope_theta"]
    if "_rope_scaling" in _ARCH_FIELDS[arch]:
        cfg["rope_scaling"] = dict(_ARCH_FIELDS[arch]["_rope_scaling"])
    cfg["torch_dtype"] = "float32"
    cfg.setdefault("dtype", "float32")
    tk.write_json(path, cfg)


def _generation_config() -> dict[str, Any]:
    # Both </s> and <|im_end|> stop generation, as in ChatML models' generation configs.
    return {
        "bos_token_id": tk.BOS_ID,
        "eos_token_id": [tk.EOS_ID, tk.IM_END_ID],
        "pad_token_id": tk.PAD_ID,
        "do_sample": False,
    }


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence transformers' progress bars inside the block, restoring the previous setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
