"""The hierarchical prefix cache (pure): named device blocks evicted while the scheduler
builds an iteration go to the host tier's cache, and a later request with that prefix
loads them back instead of recomputing them; checked against the fake K/V runner."""

from __future__ import annotations

import pytest

from tandem.config import CacheConfig, SchedulerConfig
from tandem.kvcache import KVCacheManager, KVStateError
from tandem.request import Request, SamplingParams
from tandem.sched.scheduler import Scheduler
from tests.unit.sched.fake_kv import FakeKVRunner
from tests.unit.sched.test_prefix_scheduling import BASES

BLOCK = 4


def _sched(int8: bool = False, caching: bool = True) -> tuple[Scheduler, FakeKVRunner]:
    s = Scheduler(
        SchedulerConfig(
            max_num_seqs=1, max_num_batched_tokens=64, policy="fcfs", preemption_mode="swap",
            swap_watermark=0.0,
        ),
        CacheConfig(
            block_size=BLOCK, num_blocks=8, num_host_blocks=32, swap_int8=int8,
            enable_prefix_caching=caching,
        ),
        clock=lambda: 0.0,
    )  # fmt: skip
    return s, FakeKVRunner(8, 32, BLOCK)


def _run_one(s, runner, req):
    s.add_request(req)
    outs = []
    while req.request_id in s.requests:
        out = s.schedule()
        outs.append(out)
        s.update_from_output(out, runner.run(out))
    return outs


def _one_token(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=1), 0.0)


def test_evicted_prefix_blocks_come_back_from_the_host():
    s, runner = _sched()
    _run_one(s, runner, _one_token("a", BASES[0][:16] + [1]))  # 4 named blocks + 1 partial
    outs = _run_one(s, runner, _one_token("b", BASES[1][:28]))  # 7 blocks: evicts 3 of a's
    (wb,) = outs[0].cache_out
    assert len(wb.src) == 3 and s.swap.cache_out_blocks == 3
    assert s.host_kv.num_cached_blocks == 3 and s.host_kv.pool.num_used == 0
    c = _one_token("c", BASES[0][:16] + [2])
    outs = _run_one(s, runner, c)
    # Block 0 is still on the device; blocks 1..3 are loaded from the host cache.
    assert c.num_cached_tokens == 16
    (load,) = outs[0].cache_in
    assert len(load.src) == 3 and outs[0].chunks[0].start_pos == 16
    stats = s.prefix_stats
    assert stats.host_hit_tokens == 12 and s.swap.cache_in_blocks == 3
    assert runner.reads > 0  # the fake runner checked every position c read
    # The loads' host blocks were held for the iteration only.
    assert s.host_kv.pool.num_used == 0 and s.host_kv.num_pins == 0 and s.host_kv.audit().ok


def test_the_same_answer_with_and_without_the_host_cache():
    outputs = []
    for caching in (True, False):
        s, runner = _sched(caching=caching)
        reqs = [
            _one_token("a", BASES[0][:16] + [1]),
            _one_token("b", BASES[1][:28]),
            Request("c", BASES[0][:16] + [2], SamplingParams(max_tokens=6, ignore_eos=True), 0.0),
        ]
        for r in reqs:
            _run_one(s, runner, r)
        outputs.append([r.output_token_ids for r in reqs])
        assert (s.prefix_stats.host_hit_tokens > 0) == caching
    assert outputs[0] == outputs[1]


def test_no_host_cache_with_int8_swap():
    s, runner = _sched(int8=True)
    _run_one(s, runner, _one_token("a", BASES[0][:16] + [1]))
    outs = _run_one(s, runner, _one_token("b", BASES[1][:28]))
    assert not outs[0].cache_out and s.host_kv.num_cached_blocks == 0
    assert s.device_kv.num_evictions == 3  # evicted, and gone


def test_evictions_between_iterations_are_not_written_back():
    s, runner = _sched()
    _run_one(s, runner, _one_token("a", BASES[0][:16] + [1]))
    s.device_kv.reserve_import("x", 8 * BLOCK)  # an import between steps evicts all four
    assert s.device_kv.num_evictions == 4 and s.host_kv.num_cached_blocks == 0
    s.device_kv.abort_import("x")


def test_pins_hold_cached_blocks_and_are_audited():
    m = KVCacheManager(4, 2)
    m.allocate("a", 4)
    m.cache_blocks("a", [b"x", b"y"], 4)
    ids = m.block_table("a")
    m.free("a")
    pin = m.pin(ids)
    assert m.num_free_blocks == 2 and m.num_pins == 1
    audit = m.audit()
    assert audit.ok and audit.num_used == 2
    m.allocate("b", 4)  # the two empty blocks; pinned ones are not evicted
    assert m.match_prefix([b"x", b"y"]) == ids
    m.unpin(pin)
    with pytest.raises(KVStateError, match="not held"):
        m.unpin(pin)
    with pytest.raises(KVStateError, match="not cached"):
        m.pin(m.block_table("b"))
    assert m.num_pins == 0 and m.audit().ok
