"""Incremental detokenization with stop strings (pure: never imports torch).

One ``IncrementalDetokenizer`` per streamed request turns output token ids into text
deltas that are safe to send to a client at once. Two stages, each with bounded work per
token so that a thousand concurrent streams stay cheap:

1. ``_TokenWindow`` decodes a sliding window of token ids (the vLLM / HF ``TextStreamer``
   technique). It keeps ``ids[:read]``, the last tokens already turned into text, as left
   context and decodes ``ids`` whole: the text past the context's own text is new. The
   context matters to decoders that treat the first token of a string specially
   (SentencePiece strips its leading space); it is seeded with the last few prompt
   tokens so that the first output token decodes as it would inside the whole sequence.
   Text that ends in U+FFFD is held back: with byte-level BPE a token can carry part of
   a UTF-8 character, and the character is only known once the next tokens arrive.
2. Stop strings are searched only in the held-back tail plus the new text. A stop
   string ends the request and cuts the text at its start (or end, with
   ``include_stop_str_in_output``); the trailing text that could still become the start
   of a stop string is held back, so a client never receives text that is later cut.

Invariants (for a byte-level decoder; any decoder on valid text):

- the concatenation of all deltas and ``flush()`` equals
  ``tokenizer.decode(output_ids, skip_special_tokens=...)`` (without
  ``clean_up_tokenization_spaces``) when no stop string matched, and is that text cut at
  the stop string when one did;
- a stop string counts as found where it first *ends*, so the result does not depend on
  how the text was split into tokens or into ``add_tokens`` calls;
- a delta never ends inside a UTF-8 character (only ``flush()`` releases an unfinished one,
  as U+FFFD, like ``decode``), and text is held back only while it could still change:
  an unfinished character, or a proper prefix of some stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_REPLACEMENT = "\ufffd"
# Prompt tokens that seed the window (vLLM uses the same number).
_SEED_TOKENS = 5
# How far back into the prompt to look for seed tokens past skipped special tokens.
_SEED_SCAN = 64
# Tokens held back beyond which the window looks for a boundary to cut at (see
# _TokenWindow._force_split). An unfinished UTF-8 character spans at most 3 bytes, hence at
# most 3 tokens, so only undecodable bytes or exotic decoders ever get this far.
_MAX_HELD_TOKENS = 8
_SPLIT_TRIES = 4


@dataclass
class DetokenizerUpdate:
    """What one ``add_tokens`` call produced.

    ``delta`` is new text to stream now (may be ""). ``stop_string`` is the stop string
    that matched in this call, if any: the request must then finish, and the detokenizer
    ignores any later tokens.
    """

    delta: str
    stop_string: str | None = None


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``tokenizer.decode(..., skip_special_tokens=True)`` drops.

    These are the added tokens flagged special (what the Rust decoder checks), not only the
    named ones in ``all_special_ids``. Compute once per tokenizer and pass it to every
    ``IncrementalDetokenizer`` to save the lookup per request.
    """
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if added is not None:
        return frozenset(i for i, tok in added.items() if getattr(tok, "special", False))
    return frozenset(tokenizer.all_special_ids)


def _window_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    # The Rust backend is what PreTrainedTokenizerFast.decode calls, minus Python overhead
    # and the clean-up pass (which is not incremental: it rewrites text across tokens).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class _TokenWindow:
    """Token ids in, finished text out, decoding a bounded window of ids each step.

    ``ids[:read]`` is left context whose text (``context_text`` = decode(ids[:read])) was
    already emitted; ``ids[read:]`` is held: its text is not emitted yet. The boundary at
    ``read`` never falls inside a character, so decode(ids) starts with ``context_text``.
    """

    def __init__(self, decode: Callable[[list[int]], str], seed: list[int]) -> None:
        self._decode = decode
        # A prompt that ends inside a character would glue its bytes to the output's;
        # drop such trailing tokens so the output decodes as it does on its own.
        text = decode(seed)
        while seed and text.endswith(_REPLACEMENT):
            seed.pop()
            text = decode(seed)
        self._ids = seed
        self._read = len(seed)
        self._context_text = text

    def push(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the text they finish (may be "")."""
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        if len(text) > len(self._context_text) and not text.endswith(_REPLACEMENT):
            return self._emit(text, len(self._ids))
        if len(self._ids) - self._read > _MAX_HELD_TOKENS:
            return self._force_split(text)
        return ""

    def flush(self) -> str:
        """Release the held text as it decodes now, unfinished characters included."""
        if len(self._ids) == self._read:
            return ""
        return self._emit(self._decode(self._ids), len(self._ids))

    def _emit(self, text: str, end: int) -> str:
        # ``text`` = decode(ids[:end]); ids[read:end] become the next left context.
        delta = text[len(self._context_text) :]
        # Drop the old context: the window never holds more than context + held tokens.
        self._ids = self._ids[self._read :]
        self._read = end - self._read
        self._context_text = self._decode(self._ids[: self._read])
        return delta

    def _force_split(self, text: str) -> str:
        """Emit up to the latest token boundary that no later token can change.

        Reached when many held tokens decode to text that keeps ending in U+FFFD: bytes
        that are not UTF-8, or a large ``add_tokens`` call that happens to end inside a
        character; or to no new text at all (exotic decoders). A boundary is safe when decoding both sides
        apart gives the same text as decoding them together and the right side has text:
        for a byte-level decoder that holds exactly when no character spans the boundary.
        """
        n = len(self._ids)
        for end in range(n - 1, max(self._read, n - 1 - _SPLIT_TRIES), -1):
            left = self._decode(self._ids[:end])
            right = self._decode(self._ids[end:])
            if right and left + right == text and left.startswith(self._context_text):
                return self._emit(left, end)
        return ""


class IncrementalDetokenizer:
    """Streams one request's output text; see the module docstring for the guarantees.

    ``tokenizer`` is a transformers tokenizer (fast or slow); it is only called, never
    imported here. ``special_ids`` may pass ``special_token_ids(tokenizer)`` computed once.
    Once a stop string matched or ``flush()`` ran, further tokens are ignored: tokens
    already in flight when the request was cancelled may still arrive.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        special_ids: frozenset[int] | None = None,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._skip_ids: frozenset[int] = frozenset()
        if skip_special_tokens:
            self._skip_ids = special_token_ids(tokenizer) if special_ids is None else special_ids
        self._window = _TokenWindow(
            _window_decoder(tokenizer, skip_special_tokens), self._seed(prompt_token_ids)
        )
        self._released: list[str] = []  # deltas handed out so far, joined on demand
        # Decoded but unreleased text: a proper prefix of some stop string, so shorter than
        # the longest one. Stop strings are searched in ``_held`` + new text only.
        self._held = ""
        self._stop_string: str | None = None
        self._finished = False

    @property
    def output_text(self) -> str:
        """All text released so far (the held-back text too, once flushed)."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if one did (also when found by flush)."""
        return self._stop_string

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerUpdate:
        if self._finished:
            return DetokenizerUpdate("")
        ids = [t for t in token_ids if t not in self._skip_ids]
        text = self._window.push(ids) if ids else ""
        return self._take(text, final=False)

    def flush(self) -> str:
        """Finish: release the held text, unless it passes a stop string; return it."""
        if self._finished:
            return ""
        update = self._take(self._window.flush(), final=True)
        self._finished = True
        return update.delta

    def _seed(self, prompt_token_ids: Sequence[int]) -> list[int]:
        seed: list[int] = []
        for t in reversed(prompt_token_ids[-_SEED_SCAN:]):
            if t not in self._skip_ids:
                seed.append(t)
                if len(seed) == _SEED_TOKENS:
                    break
        seed.reverse()
        return seed

    def _take(self, text: str, *, final: bool) -> DetokenizerUpdate:
        """Run new text through the stop strings; release what is safe."""
        if not self._stop:
            return self._release(text)
        # An earlier stop occurrence cannot start before ``_held``: its part before the new
        # text would be a suffix of the old text and a prefix of the stop string, so held.
        buf = self._held + text
        match = self._find_stop(buf)
        if match is not None:
            start, stop = match
            self._held = ""
            self._stop_string = stop
            self._finished = True
            cut = start + len(stop) if self._include_stop else start
            return DetokenizerUpdate(self._release(buf[:cut]).delta, stop)
        keep = 0 if final else self._stop_prefix_len(buf)
        self._held = buf[len(buf) - keep :]
        return self._release(buf[: len(buf) - keep])

    def _release(self, text: str) -> DetokenizerUpdate:
        if text:
            self._released.append(text)
        return DetokenizerUpdate(text)

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string occurrence that ends first (the longest one on a tie)."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stop:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
