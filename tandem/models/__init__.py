"""Model implementations and loading. All supported architectures share llama.py."""

from __future__ import annotations

from tandem.models.llama import LlamaForCausalLM
from tandem.models.loader import load_model

__all__ = ["LlamaForCausalLM", "load_model"]
