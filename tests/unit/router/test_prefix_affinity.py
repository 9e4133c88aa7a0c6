"""Cache-aware dispatch (pure): workers' prefix summaries (built by the real KV manager),
the router's estimate of a prompt's hit length from them, and the admission choice that
weighs it against load."""

from __future__ import annotations

import asyncio
import random

from router.admission import AdmissionQueue
from router.prefix_affinity import CACHE_WEIGHT, RECENT_S, PrefixAffinity
from tandem.kvcache import BlockHasher, KVCacheManager

BS = 16
SALT = "model-x"
_rng = random.Random(0)
SYSTEM = [_rng.randrange(50_000) for _ in range(16 * 40)]  # 40 blocks


class FakeWorker:
    def __init__(self, salt: str = SALT, slots: int = 256) -> None:
        self.connected = True
        self.hello = {"max_num_seqs": slots, "kv_blocks": 1000, "block_size": BS,
                      "cache_salt": salt}  # fmt: skip
        self.in_flight = 0
        self.stats: dict = {}
        self.kv = KVCacheManager(1000, BS)

    def cache(self, tokens: list[int]) -> None:
        """Compute and cache ``tokens`` here, then publish stats as a worker does."""
        names = BlockHasher(BS, self.hello["cache_salt"]).hashes(tokens)
        rid = f"r{len(self.kv._summary)}-{len(tokens)}"
        self.kv.allocate(rid, len(tokens))
        self.kv.cache_blocks(rid, names, len(tokens))
        self.kv.free(rid)
        self.stats = {"prefix_summary": self.kv.prefix_summary(2048)}


def _tail(n: int) -> list[int]:
    return [_rng.randrange(50_000) for _ in range(n)]


def test_the_estimate_is_within_a_factor_two_of_the_hit():
    w = FakeWorker()
    w.cache(SYSTEM)
    aff = PrefixAffinity()
    for blocks in (1, 2, 3, 5, 8, 17, 40):
        prompt = SYSTEM[: blocks * BS] + _tail(7)
        bonus = aff.scorer(prompt)(w)
        est_tokens = bonus / CACHE_WEIGHT * len(prompt)
        assert blocks * BS / 2 < est_tokens <= blocks * BS, (blocks, est_tokens)
    assert aff.scorer(_tail(300))(w) == 0.0  # nothing shared
    assert aff.scorer(SYSTEM[:10])(w) == 0.0  # no full block to hit


def test_a_worker_with_another_salt_or_no_cache_scores_nothing():
    other, plain = FakeWorker(), FakeWorker()
    other.cache(SYSTEM)
    other.hello["cache_salt"] = "model-y"  # its blocks are another model's K/V
    plain.cache(SYSTEM)
    plain.hello.pop("cache_salt")
    score = PrefixAffinity().scorer(SYSTEM + _tail(5))
    assert score(other) == 0.0 and score(plain) == 0.0


def test_dispatch_follows_the_prefix_between_equal_loads_but_not_past_a_big_one():
    async def main():
        holder, other = FakeWorker(), FakeWorker()
        holder.cache(SYSTEM)
        q = AdmissionQueue(lambda: [other, holder], dispatch="prefix")
        aff = PrefixAffinity()
        prompt = SYSTEM + _tail(20)
        worker, _ = await q.admit(len(prompt), affinity=aff.scorer(prompt))
        assert worker is holder
        assert q.try_admit(affinity=aff.scorer(_tail(200))) is other  # tie: first listed
        holder.stats["kv_used"] = 700  # 0.7 of its KV in use: more than the bonus
        assert q.try_admit(affinity=aff.scorer(prompt)) is other
        q_usage = AdmissionQueue(lambda: [other, holder], dispatch="usage")
        holder.stats["kv_used"] = 0
        assert q_usage.try_admit(affinity=aff.scorer(prompt)) is other  # usage ignores it

    asyncio.run(main())


def test_recent_dispatches_count_until_the_worker_reports():
    now = [0.0]
    aff = PrefixAffinity(clock=lambda: now[0])
    a, b = FakeWorker(), FakeWorker()
    prompt = SYSTEM + _tail(3)
    first = aff.scorer(prompt)
    assert first(a) == first(b) == 0.0
    aff.routed(a, first)
    follow = aff.scorer(SYSTEM[: 32 * BS] + _tail(9))
    assert follow(a) > 0 and follow(b) == 0.0  # a burst follows the first request
    now[0] += RECENT_S + 1
    assert aff.scorer(prompt)(a) == 0.0  # a never said it cached it: forgotten
    assert aff.hits == 0


def test_summary_is_most_recent_first_bounded_and_forgets_evictions():
    m = KVCacheManager(64, 4)
    h = BlockHasher(4)
    old, new = list(range(100, 132)), list(range(200, 232))  # 8 blocks each
    for rid, toks in (("old", old), ("new", new)):
        m.allocate(rid, len(toks))
        m.cache_blocks(rid, h.hashes(toks), len(toks))
        m.free(rid)
    from tandem.kvcache.prefix import short_hash

    keys = lambda toks: [short_hash(h.hashes(toks)[i]) for i in (0, 1, 3, 7)]  # noqa: E731
    assert m.prefix_summary(100) == keys(new)[::-1] + keys(old)[::-1]
    assert m.prefix_summary(3) == keys(new)[::-1][:3]
    m.adopt_prefix("hit", m.match_prefix(h.hashes(old)))  # a hit makes old recent again
    assert m.prefix_summary(4) == keys(old)[::-1]
    m.free("hit")
    m.pool.evict_all()
    assert m.prefix_summary(100) == []
