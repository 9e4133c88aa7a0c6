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
        self._word_ids: np.ndarray | None = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _words(self) -> np.ndarray:
        """Ordinary tokens that are a whole word with a leading space and encode back to
        themselves: joined, they re-encode token for token under a whitespace pre-tokenizer
        (byte-level BPE, metaspace), so prompts get exact lengths on the first try."""
        if self._word_ids is None:
            words = []
            for i in self.usable_ids.tolist():
                s = self._tok.decode([i])
                if len(s) > 1 and s[0] == " " and s[1:].isalpha() and self.encode(s) == [i]:
                    words.append(i)
            self._word_ids = np.array(words if len(words) >= 64 else self.usable_ids, np.int64)
        return self._word_ids

    def text_of_ids(self, ids: list[int], length: int | None = None) -> tuple[str, int]:
        """Text for ``ids`` (mapped onto whole-word tokens), fixed up to re-encode to
        ``length`` tokens (default ``len(ids)``). Returns (text, real token count)."""
        target = len(ids) if length is None else length
        words = self._words()
        ids = [int(words[i % len(words)]) for i in ids]
        text = self.decode(ids)
        best = (text, self.count(text))
        for attempt in range(16):
            enc = self.encode(text)
            n = len(enc)
            if abs(n - target) < abs(best[1] - target):
                best = (text, n)
            if n == target:
                return text, n
            if n > target:
                text = self.decode(enc[: max(target - (attempt % 2), 1)])
            else:  # merges shrank it: append more words
                extra = [int(words[(sum(enc) + k) % len(words)]) for k in range(target - n)]
                text = self.decode(enc + extra)
        return best

    def text_of_length(self, rng: np.random.Generator, length: int) -> tuple[str, int]:
        """Random text of ``length`` tokens. Returns (text, real token count)."""
        ids = rng.integers(0, len(self._words()), max(length, 1)).tolist()
        return self.text_of_ids(ids, length)
