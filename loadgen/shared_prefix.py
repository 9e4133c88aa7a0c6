"""Workloads that share prompt prefixes, to measure prefix caching (pure; numpy only).

``prefix``
    ``num_prefixes`` shared prefixes (a system prompt, a RAG context, few-shot examples) of
    ``prefix_len`` tokens; request ``k`` uses prefix ``k mod num_prefixes`` followed by its
    own ``suffix_len`` tokens. With caching, only the first request of each prefix computes
    it; every later one computes its suffix alone.
``chat``
    ``num_conversations`` multi-turn conversations of ``turns`` turns: a ``prefix_len``
    system prompt, then per turn ``suffix_len`` new user tokens. Each turn resends the
    whole history: the previous turn's prompt, the answer the server actually gave it, and
    the new user text (the run sends a turn only after the previous one of its conversation
    ended: ``Job.after``). Turns of different conversations interleave: all first turns,
    then all second turns, ... so a server sees many conversations at once, as a chat
    service does. A turn whose previous one failed is sent with a synthetic answer of
    ``output_len`` tokens in its place (its static ``prompt``).

Token ids map onto whole-word tokens (``PromptTokenizer.text_of_ids``), so a prefix's text
re-encodes to the same tokens whatever follows it, and the server's cache sees the shared
prefix exactly.
"""

from __future__ import annotations

import numpy as np

SHARED_PREFIX_WORKLOADS = ("prefix", "chat")


def _ids(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


def prefix_prompts(
    n: int, num_prefixes: int, prefix_len: int, suffix_len: int, vocab: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, suffix ids) of ``n`` requests."""
    if num_prefixes < 1 or prefix_len < 0 or suffix_len < 1:
        raise ValueError("--num-prefixes >= 1, --prefix-len >= 0 and --suffix-len >= 1")
    rng = np.random.default_rng(seed)
    prefixes = [_ids(rng, vocab, prefix_len) for _ in range(num_prefixes)]
    return [(prefixes[k % num_prefixes], _ids(rng, vocab, suffix_len)) for k in range(n)]


def chat_turns(
    num_conversations: int, turns: int, system_len: int, user_len: int, answer_len: int,
    vocab: int, seed: int,
) -> list[tuple[int, int, list[int], list[int]]]:  # fmt: skip
    """Turns in send order: (conversation, turn, static prompt ids, new user ids). The
    static prompt is the history with synthetic answers of ``answer_len`` ids."""
    if num_conversations < 1 or turns < 1 or system_len < 0 or user_len < 1:
        raise ValueError("--num-conversations, --turns, --suffix-len >= 1, --prefix-len >= 0")
    rng = np.random.default_rng(seed)
    history = [_ids(rng, vocab, system_len) for _ in range(num_conversations)]
    out = []
    for t in range(turns):
        for c in range(num_conversations):
            user = _ids(rng, vocab, user_len)
            if t:
                history[c] = history[c] + _ids(rng, vocab, answer_len)  # a synthetic answer
            history[c] = history[c] + user
            out.append((c, t, list(history[c]), user))
    return out
