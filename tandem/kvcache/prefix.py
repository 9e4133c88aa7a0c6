"""Content addresses of full KV blocks, for automatic prefix caching (pure Python).

A block's K/V depend on every token before it (attention), so a block is named by a hash
chain: ``hash(i) = H(hash(i-1) || tokens of block i)``, with ``hash(-1) = H(salt)``. The
salt names everything else that changes the K/V bytes (model, dtype, block size, KV
layout: ``kv_cache_salt``), so two engines agree on a name iff they would compute the
same bytes. Equal names at block ``i`` mean equal token prefixes ``0 .. (i+1)·bs``.

Only FULL blocks have a name (and can be cached and shared). A request's partial last
block is private to it and is the only block it ever writes, so a shared block is never
written: there is no copy-on-write anywhere.

H is BLAKE2b with a 16-byte digest: stable across processes and machines (the router and
every worker compute the same names) and collision-resistant, so a crafted prompt cannot
alias another user's prefix (Python's ``hash`` of a tuple is 64 bits and not keyed).

Cost: one BLAKE2b call of ``16 + 4·block_size`` bytes per full block, computed once per
block of a request (``BlockHasher.extend`` is incremental): O(blocks touched).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes  # 16-byte digest

_DIGEST = 16
_TOKEN_CODE = "I" if array("I").itemsize == 4 else "L"


def root_hash(salt: str) -> BlockHash:
    """The parent hash of a sequence's first block."""
    return hashlib.blake2b(b"tandem-kv-root\0" + salt.encode(), digest_size=_DIGEST).digest()


def hash_block(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The name of a full block holding ``token_ids`` after the prefix named ``parent``."""
    h = hashlib.blake2b(parent, digest_size=_DIGEST)
    h.update(array(_TOKEN_CODE, token_ids).tobytes())
    return h.digest()


def short_hash(h: BlockHash) -> int:
    """A 63-bit integer form of a block name, for compact summaries (msgpack-friendly)."""
    return int.from_bytes(h[:8], "big") >> 1


def summary_depth(index: int) -> bool:
    """Whether block ``index`` of a chain appears in prefix summaries: indexes 0, 1, 3, 7,
    15, ... (``index + 1`` a power of two). A summary then names a cached prefix of ``b``
    blocks by O(log b) entries, and the longest listed depth a request matches is at least
    half its real hit length."""
    n = index + 1
    return n & (n - 1) == 0


class BlockHasher:
    """Names of a token sequence's full blocks, for one block size and salt."""

    def __init__(self, block_size: int, salt: str = "") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.salt = salt
        self.root = root_hash(salt)

    def extend(self, hashes: list[BlockHash], token_ids: Sequence[int], num_tokens: int) -> None:
        """Append to ``hashes`` (the names of the first ``len(hashes)`` blocks of
        ``token_ids``) the names of every further full block within ``num_tokens`` tokens.
        O(new blocks)."""
        bs = self.block_size
        full = min(num_tokens, len(token_ids)) // bs
        parent = hashes[-1] if hashes else self.root
        for i in range(len(hashes), full):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)

    def append(self, hashes: list[BlockHash], token_ids: Sequence[int]) -> None:
        """Append the names of the full blocks in ``token_ids``, the tokens that follow
        the ``len(hashes)`` blocks already named (a trailing partial block is ignored)."""
        bs = self.block_size
        parent = hashes[-1] if hashes else self.root
        for i in range(len(token_ids) // bs):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)

    def hashes(self, token_ids: Sequence[int]) -> list[BlockHash]:
        out: list[BlockHash] = []
        self.extend(out, token_ids, len(token_ids))
        return out


@dataclass
class PrefixCacheStats:
    """Cumulative prefix-cache counters of one engine (worker stats and /metrics).

    A request is counted once, when it is first admitted: ``query_tokens`` are its prompt
    tokens, ``hit_tokens`` those whose K/V came from a cache (device, or host with the
    hierarchical cache) instead of being computed. Re-admissions after a recompute
    preemption are counted apart (``resume_hit_tokens``): they are the cache saving work
    the preemption threw away, not prompt reuse.
    """

    queries: int = 0  # requests admitted
    hits: int = 0  # ... of which with at least one cached block
    query_tokens: int = 0
    hit_tokens: int = 0
    host_hit_tokens: int = 0  # of hit_tokens, swapped in from the host tier's cache
    resume_hit_tokens: int = 0

    def record(self, prompt_tokens: int, hit_tokens: int, host_tokens: int = 0) -> None:
        self.queries += 1
        self.query_tokens += prompt_tokens
        if hit_tokens:
            self.hits += 1
            self.hit_tokens += hit_tokens
            self.host_hit_tokens += host_tokens

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def request_hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
