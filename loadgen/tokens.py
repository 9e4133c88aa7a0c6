"""Token counting and prompts of an exact token length, from a local tokenizer folder.

Only the ``tokenizers`` library is used (no torch, no transformers, no download): the folder
must hold a ``tokenizer.json`` (every Hugging Face fast tokenizer has one).

Contract of :meth:`PromptTokenizer.text_of_length`: the returned text re-encodes (without
special tokens) to exactly the returned length, which is the requested length except where
the tokenizer cannot produce it (then the closest length found, and the caller records the
real one). Random token ids are decoded, re-encoded and trimmed until the round trip is
stable, as vLLM's random dataset does; special and added tokens are never sampled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class TokenizerError(ValueError):
    """The tokenizer folder is missing or unusable (message names the path)."""


class PromptTokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(path)
        file = folder / "tokenizer.json" if folder.is_dir() else folder
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path} (give a model/tokenizer folder)")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises plain Exception on a bad file
            raise TokenizerError(f"cannot load {file}: {e}") from None
        special = set(self._tok.get_added_tokens_decoder())
        config = folder / "tokenizer_config.json"
        if folder.is_dir() and config.is_file():
            for entry in json.loads(config.read_text()).get("added_tokens_decoder", {}):
                special.add(int(entry))
        vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.usable_ids = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
        if len(self.usable_ids) == 0:
            raise TokenizerError(f"{file} has no ordinary tokens")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def text_of_ids(self, ids: list[int], length: int | None = None) -> tuple[str, int]:
        """Text for ``ids`` (mapped onto ordinary tokens), fixed up to re-encode to
        ``length`` tokens (default ``len(ids)``). Returns (text, real token count)."""
        target = len(ids) if length is None else length
        usable = self.usable_ids
        ids = [int(usable[i % len(usable)]) for i in ids]
        text = self.decode(ids)
        best = (text, self.count(text))
        for _ in range(8):
            enc = self.encode(text)
            n = len(enc)
            if abs(n - target) < abs(best[1] - target):
                best = (text, n)
            if n == target:
                return text, n
            if n > target:
                text = self.decode(enc[:target])
            else:  # merges shrank it: append more ordinary tokens
                extra = [int(usable[(sum(enc) + k) % len(usable)]) for k in range(target - n)]
                text = self.decode(enc + extra)
        n = self.count(text)
        return (text, n) if abs(n - target) <= abs(best[1] - target) else best

    def text_of_length(self, rng: np.random.Generator, length: int) -> tuple[str, int]:
        """Random text of ``length`` tokens. Returns (text, real token count)."""
        ids = rng.integers(0, len(self.usable_ids), max(length, 1)).tolist()
        return self.text_of_ids(ids, length)
