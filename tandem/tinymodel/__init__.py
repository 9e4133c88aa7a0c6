"""The small model that Tandem generates for itself: tests, examples and ``tandem serve``'s default.

Nothing is downloaded. ``make_tiny_model(dir, arch, seed)`` writes a complete Hugging Face
folder (config, random safetensors weights, a byte-level BPE tokenizer trained here on a
generated corpus, a ChatML chat template); ``default_model_dir()`` builds the tiny Llama once
under the cache directory and returns it. The weights are initialised so that greedy decoding
has wide top-1/top-2 logit margins (see ``build``), which keeps float32 parity tests against
transformers stable. Importing this package is cheap; torch and transformers load on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_ARCH = "llama"
DEFAULT_SEED = 0
__all__ = ["ARCHS", "default_model_dir", "default_model_path", "make_tiny_model"]


def default_model_path() -> Path:
    """Where ``default_model_dir()`` keeps the bundled model; nothing is built (no torch),
    so the folder may not exist yet."""
    from tandem import env

    return env.cache_dir() / "models" / f"tiny-{DEFAULT_ARCH}-s{DEFAULT_SEED}"


if TYPE_CHECKING:
    from tandem.tinymodel.build import default_model_dir, make_tiny_model


def __getattr__(name: str) -> Any:
    if name in ("make_tiny_model", "default_model_dir"):
        from tandem.tinymodel import build

        return getattr(build, name)
    raise AttributeError(f"module 'tandem.tinymodel' has no attribute {name!r}")
