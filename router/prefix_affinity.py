"""Cache-aware dispatch: prefer the worker that already holds a prompt's prefix (pure).

Each worker names its cached KV blocks by content (``tandem.kvcache.prefix``: a hash
chain over full blocks, salted by model and KV layout) and reports a compact summary in
its stats: the short names of its cached blocks at depths 1, 2, 4, 8, ... blocks
(``summary_depth``), most recently used first, a few thousand at most. The router names
the prompt's blocks the same way (block size and salt from the worker's hello) and looks
its summary-depth names up: the deepest one a worker lists bounds the prompt's hit
length there from below, within a factor of two of the truth.

The router also remembers, per worker, the summary-depth names of the prompts it sent
there in the last ``RECENT_S`` seconds: a worker reports what it cached only once per
stats period, and a burst of requests sharing a new prefix should follow the first one.

Scoring (``AdmissionQueue`` with dispatch ``prefix``): a worker's Llumnix usage (KV in use
over capacity plus occupied batch slots) minus ``CACHE_WEIGHT`` times the fraction of the
prompt it holds. Between equally loaded workers the one with the longest hit wins; a
worker whose load exceeds another's by more than that bonus loses the request anyway, so
a popular prefix cannot pile every request onto one worker and starve the rest (as
SGLang's router balances cache hits against load, and Dynamo's KV router scores overlap
against load).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from tandem.kvcache.prefix import BlockHasher, short_hash, summary_depth

CACHE_WEIGHT = 0.5  # usage units a fully cached prompt is worth
RECENT_S = 10.0  # how long a dispatch counts as cached there, before the worker says so
RECENT_MAX = 4096  # remembered names per worker


class _WorkerView:
    """What the router knows of one worker's cache."""

    def __init__(self) -> None:
        self.stats_id: int | None = None
        self.summary: frozenset[int] = frozenset()
        self.recent: OrderedDict[int, float] = OrderedDict()

    def refresh(self, stats: dict[str, Any]) -> None:
        if id(stats) != self.stats_id:  # a new stats frame: rebuild the set once
            self.stats_id = id(stats)
            self.summary = frozenset(stats.get("prefix_summary") or ())

    def holds(self, key: int, now: float) -> bool:
        if key in self.summary:
            return True
        at = self.recent.get(key)
        return at is not None and now - at < RECENT_S

    def remember(self, keys: Sequence[int], now: float) -> None:
        for key in keys:
            self.recent[key] = now
            self.recent.move_to_end(key)
        while len(self.recent) > RECENT_MAX:
            self.recent.popitem(last=False)


class PrefixAffinity:
    def __init__(self, metrics: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``metrics``: a ``RouterMetrics`` whose ``prefix_dispatches`` this counts."""
        self.metrics = metrics
        self.clock = clock
        self._views: dict[int, _WorkerView] = {}
        self._hashers: dict[tuple[int, str], BlockHasher] = {}
        self.hits = 0  # dispatches that went to a worker holding part of the prompt

    def _hasher(self, worker: Any) -> BlockHasher | None:
        hello = worker.hello or {}
        bs, salt = hello.get("block_size"), hello.get("cache_salt")
        if not isinstance(bs, int) or bs < 1 or not isinstance(salt, str):
            return None  # a worker without a prefix cache (or an older one)
        key = (bs, salt)
        hasher = self._hashers.get(key)
        if hasher is None:
            hasher = self._hashers[key] = BlockHasher(bs, salt)
        return hasher

    def _view(self, worker: Any) -> _WorkerView:
        view = self._views.get(id(worker))
        if view is None:
            view = self._views[id(worker)] = _WorkerView()
        return view

    def keys(self, worker: Any, prompt: Sequence[int]) -> list[int]:
        """Short names of the prompt's blocks at summary depths, as ``worker`` names them
        (only blocks a request can hit: at least one token is always computed)."""
        hasher = self._hasher(worker)
        if hasher is None or len(prompt) < 2:
            return []
        names = hasher.hashes(prompt[: (len(prompt) - 1) // hasher.block_size * hasher.block_size])
        return [short_hash(n) for i, n in enumerate(names) if summary_depth(i)]

    def scorer(self, prompt: Sequence[int]) -> PromptScore:
        """The score of sending ``prompt`` to each worker (see ``PromptScore``)."""
        return PromptScore(self, prompt, self.clock())

    def routed(self, worker: Any, score: PromptScore) -> None:
        """The prompt went to ``worker``: its prefix will be cached there."""
        bonus = score(worker)
        keys = score.keys(worker)
        if keys:
            self._view(worker).remember(keys, self.clock())
        if bonus > 0:
            self.hits += 1
            if self.metrics is not None:
                self.metrics.prefix_dispatches += 1


class PromptScore:
    """``score(worker)``: the usage bonus of sending one prompt there, 0 .. CACHE_WEIGHT.
    The prompt is named once per (block size, salt), not once per worker."""

    def __init__(self, affinity: PrefixAffinity, prompt: Sequence[int], now: float) -> None:
        self.affinity, self.prompt, self.now = affinity, prompt, now
        self._keys: dict[tuple[Any, Any], list[int]] = {}

    def keys(self, worker: Any) -> list[int]:
        hello = worker.hello or {}
        salt = (hello.get("block_size"), hello.get("cache_salt"))
        keys = self._keys.get(salt)
        if keys is None:
            keys = self._keys[salt] = self.affinity.keys(worker, self.prompt)
        return keys

    def __call__(self, worker: Any) -> float:
        keys = self.keys(worker)
        if not keys:
            return 0.0
        view = self.affinity._view(worker)
        view.refresh(worker.stats)
        depth = 0  # blocks: summary keys sit at block counts 1, 2, 4, 8, ...
        for j, key in enumerate(keys):
            if not view.holds(key, self.now):
                break
            depth = 1 << j
        bs = worker.hello["block_size"]
        return CACHE_WEIGHT * min(depth * bs / len(self.prompt), 1.0)
