"""The scheduler with prefix caching (pure): requests that share prefixes of many lengths,
under chunked prefill, recompute and swap preemption and proactive offload, run against a
fake runner that keeps fake K/V in its blocks and checks every position a request reads
(``fake_kv.py``). Properties: outputs equal those of the same workload without caching;
no chunk writes a shared or cached block; every invariant of the scheduler still holds;
nothing leaks; the cache really served tokens."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tandem.config import CacheConfig, SchedulerConfig
from tandem.kvcache import KVStateError
from tandem.request import Request, RequestStatus, SamplingParams
from tandem.sched.scheduler import Scheduler
from tests.unit.sched.fake_kv import FakeKVRunner
from tests.unit.sched.test_scheduler_properties import _check_queues, _policy

BLOCK = 4
_rng = random.Random(3)
BASES = [[_rng.randrange(10, 90) for _ in range(48)] for _ in range(3)]


def _prompt(base: int, cut: int, tail: int, i: int) -> list[int]:
    return BASES[base][:cut] + [100 + i] * tail or [100 + i]


def _scheduler(caching: bool, **kw) -> Scheduler:
    cache = dict(block_size=BLOCK, num_blocks=64, num_host_blocks=0)
    sched = dict(max_num_seqs=8, max_num_batched_tokens=32, policy="fcfs")
    for k, v in kw.items():
        (cache if k in cache or k == "swap_int8" else sched)[k] = v
    return Scheduler(
        SchedulerConfig(**sched),
        CacheConfig(enable_prefix_caching=caching, **cache),
        policy=kw.get("policy_obj"),
        clock=lambda: 0.0,
    )


def _drive(s: Scheduler, runner: FakeKVRunner, arrivals, max_iters: int = 5000):
    """Run to completion; ``arrivals``: (iteration, Request) sorted by iteration."""
    pending = list(arrivals)[::-1]
    outputs: dict[str, list[int]] = {}
    for it in range(max_iters):
        while pending and pending[-1][0] <= it:
            req = pending.pop()[1]
            s.add_request(req)
            outputs[req.request_id] = req.output_token_ids
        if not s.requests and not pending:
            return outputs
        out = s.schedule()
        _check_iteration(s, out)
        s.update_from_output(out, runner.run(out), seconds=0.01)
        _check_queues(s)
    raise AssertionError("the scheduler stopped making progress")


def _check_iteration(s: Scheduler, out) -> None:
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    assert len(out.chunks) <= s.config.max_num_seqs
    assert not (out.swaps_out and out.swaps_in)
    for c in out.chunks:
        assert c.start_pos == c.request.num_computed_tokens
        assert c.start_pos + c.num_tokens <= c.request.num_tokens
    for kv in (s.device_kv, s.host_kv):
        if kv is None:
            continue
        audit = kv.audit()
        assert audit.ok, audit
        assert audit.shared_unnamed == (), "a shared block that is not a full cached block"


workloads = st.lists(
    # base prefix, cut, tail length, max_tokens, priority, arrival iteration
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 48),
        st.integers(0, 9),
        st.integers(1, 12),
        st.integers(0, 2),
        st.integers(0, 25),
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.parametrize("policy_name", ["fcfs", "mlfq"])
@settings(max_examples=200, deadline=None)
@given(
    reqs=workloads,
    budget=st.integers(1, 40),
    max_seqs=st.integers(1, 6),
    num_blocks=st.integers(18, 50),  # 18 = the largest request's need (71 tokens)
    host_blocks=st.sampled_from([0, 8, 64]),
    chunked=st.booleans(),
    watermark=st.sampled_from([0.0, 0.3]),
)
@example(  # one shared 48-token prefix, block-aligned and not, room for little else
    reqs=[(0, 48, 0, 8, 0, 0), (0, 48, 3, 8, 0, 1), (0, 33, 0, 8, 0, 2), (0, 48, 0, 8, 0, 3)],
    budget=16, max_seqs=4, num_blocks=18, host_blocks=64, chunked=True, watermark=0.3,
)  # fmt: skip
def test_shared_prefixes_read_the_right_kv_and_match_an_uncached_run(
    policy_name, reqs, budget, max_seqs, num_blocks, host_blocks, chunked, watermark
):
    if not chunked:
        budget = max(budget, 72)  # prompt + output must fit one pass (recompute)

    def run(caching: bool):
        s = Scheduler(
            SchedulerConfig(
                max_num_seqs=max_seqs,
                max_num_batched_tokens=budget,
                enable_chunked_prefill=chunked,
                preemption_mode="swap" if host_blocks else "recompute",
                swap_watermark=watermark,
                policy=policy_name,
            ),
            CacheConfig(
                block_size=BLOCK,
                num_blocks=num_blocks,
                num_host_blocks=host_blocks,
                enable_prefix_caching=caching,
            ),
            policy=_policy(policy_name),
            clock=lambda: 0.0,
        )
        runner = FakeKVRunner(num_blocks, host_blocks, BLOCK)
        arrivals = sorted(
            (
                (arr, Request(f"r{i}", _prompt(b, cut, tail, i),
                              SamplingParams(max_tokens=mt, ignore_eos=True), float(i), prio))
                for i, (b, cut, tail, mt, prio, arr) in enumerate(reqs)
            ),
            key=lambda x: x[0],
        )  # fmt: skip
        outputs = _drive(s, runner, arrivals)
        assert s.device_kv.pool.num_used == 0 and s.device_kv.num_free_blocks == num_blocks
        if s.host_kv is not None:
            assert s.host_kv.pool.num_used == 0
        s.device_kv.pool.check()
        return outputs, s

    plain, s0 = run(False)
    cached, s1 = run(True)
    assert cached == plain
    assert s0.prefix_stats.hit_tokens == 0 and s0.device_kv.num_cached_blocks == 0
    st1 = s1.prefix_stats
    assert st1.queries == len(reqs) and st1.hit_tokens <= st1.query_tokens


def test_a_shared_system_prompt_is_computed_once():
    s = _scheduler(True)
    runner = FakeKVRunner(64, 0, BLOCK)
    system = BASES[0][:32]  # 8 full blocks
    first = Request("a", system + [1, 2, 3], SamplingParams(max_tokens=1), 0.0)
    _drive(s, runner, [(0, first)])
    assert s.device_kv.num_cached_blocks == 8  # its partial last block is not named
    reqs = [
        Request(f"b{i}", system + [50 + i] * (i + 1), SamplingParams(max_tokens=3), 1.0)
        for i in range(4)
    ]
    for r in reqs:
        s.add_request(r)
    out = s.schedule()
    assert {c.request.request_id: c.start_pos for c in out.chunks} == {
        f"b{i}": 32 for i in range(4)
    }
    shared = out.chunks[0].block_table[:8]
    assert all(c.block_table[:8] == shared for c in out.chunks)
    assert all(s.device_kv.pool.refcount(b) == 4 for b in shared)
    s.update_from_output(out, runner.run(out))
    stats = s.prefix_stats
    assert stats.queries == 5 and stats.hits == 4 and stats.hit_tokens == 4 * 32
    assert [r.num_cached_tokens for r in reqs] == [32] * 4


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_a_fully_cached_prompt_still_computes_a_token(extra):
    """Block-aligned (extra 0): the last full block is recomputed so logits exist."""
    s = _scheduler(True)
    runner = FakeKVRunner(64, 0, BLOCK)
    prompt = BASES[1][: 16 + extra]
    a = Request("a", list(prompt), SamplingParams(max_tokens=1), 0.0)
    _drive(s, runner, [(0, a)])
    b = Request("b", list(prompt), SamplingParams(max_tokens=4, ignore_eos=True), 1.0)
    s.add_request(b)
    out = s.schedule()
    (chunk,) = out.chunks
    hit = (len(prompt) - 1) // BLOCK * BLOCK
    assert chunk.start_pos == hit and chunk.num_tokens == len(prompt) - hit >= 1
    assert chunk.sample
    s.update_from_output(out, runner.run(out))
    assert b.output_token_ids == [a.output_token_ids[0]]


def test_a_preempted_request_resumes_from_its_own_cached_blocks():
    s = _scheduler(True, num_blocks=10, max_num_seqs=2, max_num_batched_tokens=64)
    runner = FakeKVRunner(10, 0, BLOCK)
    low = Request("low", BASES[0][:20], SamplingParams(max_tokens=12, ignore_eos=True), 0.0, 1)
    s.add_request(low)
    for _ in range(3):
        out = s.schedule()
        s.update_from_output(out, runner.run(out))
    high = Request("high", BASES[2][:20], SamplingParams(max_tokens=4, ignore_eos=True), 1.0, 0)
    s.add_request(high)
    out = s.schedule()
    assert out.preempted == ["low"] and low.num_computed_tokens == 0
    s.update_from_output(out, runner.run(out))
    while "high" in s.requests:
        out = s.schedule()
        s.update_from_output(out, runner.run(out))
    out = s.schedule()
    (chunk,) = [c for c in out.chunks if c.request is low]
    # 22 tokens were computed before the preemption: 5 full blocks were cached. high took
    # the 5 empty blocks, then evicted one for its 6th: the chain's tail, so the first 4
    # of low's blocks survive.
    assert chunk.start_pos == 16
    assert s.prefix_stats.resume_hit_tokens == 16 and s.prefix_stats.hit_tokens == 0
    s.update_from_output(out, runner.run(out))


def test_a_request_not_admitted_gives_its_prefix_back():
    s = _scheduler(True, num_blocks=12, max_num_seqs=1, max_num_batched_tokens=64)
    runner = FakeKVRunner(12, 0, BLOCK)
    a = Request("a", BASES[0][:24], SamplingParams(max_tokens=1), 0.0)
    _drive(s, runner, [(0, a)])
    busy = Request("busy", [7] * 8, SamplingParams(max_tokens=30, ignore_eos=True), 1.0)
    s.add_request(busy)
    out = s.schedule()
    s.update_from_output(out, runner.run(out))
    b = Request("b", BASES[0][:24] + [9], SamplingParams(max_tokens=1), 2.0)
    s.add_request(b)
    out = s.schedule()  # the only batch slot is busy's
    assert [c.request.request_id for c in out.chunks] == ["busy"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert not s.device_kv.has("b")
    assert s.device_kv.pool.num_evictable == 6  # a's blocks are cached, unreferenced


def test_caching_off_shares_nothing():
    s = _scheduler(False)
    runner = FakeKVRunner(64, 0, BLOCK)
    for i in range(3):
        r = Request(f"r{i}", BASES[0][:32], SamplingParams(max_tokens=2), float(i))
        _drive(s, runner, [(0, r)])
    assert s.device_kv.num_cached_blocks == 0 and s.prefix_stats.hit_tokens == 0


def test_int8_swapped_blocks_are_never_named():
    """A request swapped through the lossy int8 host tier names nothing afterwards."""
    s = _scheduler(
        True, num_blocks=8, num_host_blocks=32, swap_int8=True, max_num_seqs=2,
        preemption_mode="swap", max_num_batched_tokens=64,
    )  # fmt: skip
    low = Request("low", BASES[0][:16], SamplingParams(max_tokens=10, ignore_eos=True), 0.0, 1)
    s.add_request(low)
    runner = FakeKVRunner(8, 32, BLOCK)
    out = s.schedule()
    s.update_from_output(out, runner.run(out))
    named_before = s.device_kv.num_cached_blocks
    high = Request("high", BASES[1][:20], SamplingParams(max_tokens=2, ignore_eos=True), 1.0, 0)
    s.add_request(high)
    while "low" in s.requests:
        out = s.schedule()
        s.update_from_output(out, runner.run(out))
    assert low.num_preemptions >= 1 and s.num_swapped_in_blocks > 0
    # low's own blocks named before the swap stay; nothing it computed after it is named.
    assert s.device_kv.num_cached_blocks <= named_before + 5  # high's 5 full blocks


def test_a_chunk_into_a_cached_block_is_refused():
    """The guard in ``_add_chunk``: were a bug to rewind a request into its named blocks,
    scheduling it raises instead of overwriting K/V that other requests may share."""
    s = _scheduler(True)
    r = Request("r", BASES[0][:8], SamplingParams(max_tokens=5, ignore_eos=True), 0.0)
    s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, FakeKVRunner(64, 0, BLOCK).run(out))
    assert s.device_kv.num_cached_blocks == 2
    r.num_computed_tokens = 4  # the simulated bug
    with pytest.raises(KVStateError, match="shared or cached"):
        s.schedule()


def test_mlfq_joins_on_the_uncached_prompt_length():
    """Skip-join ranks a request by the prefill it needs: one whose long prompt is mostly
    cached joins the same queue as a short uncached one, above an uncached twin."""
    from tandem.sched.cost_model import CostModel
    from tandem.sched.mlfq import MLFQPolicy

    # prefill 1 ms/token, q0 = 4 ms: 44 tokens need ~45 ms (queue 4), 8 tokens queue 1.
    policy = MLFQPolicy(CostModel(prefill_base=0.0, prefill_per_token=1e-3), q0=4e-3)
    s = Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, policy="mlfq"),
        CacheConfig(block_size=BLOCK, num_blocks=64, enable_prefix_caching=True),
        policy=policy,
        clock=lambda: 0.0,
    )
    runner = FakeKVRunner(64, 0, BLOCK)
    first = Request("first", _prompt(0, 40, 4, 0), SamplingParams(max_tokens=2), 0.0)
    _drive(s, runner, [(0, first)])
    shared = Request("shared", _prompt(0, 40, 4, 1), SamplingParams(max_tokens=2), 0.0)
    fresh = Request("fresh", _prompt(1, 40, 4, 2), SamplingParams(max_tokens=2), 0.0)
    s.add_request(shared)
    s.add_request(fresh)
    assert shared.num_cached_tokens == 40  # 10 full blocks of the shared 40 tokens
    assert fresh.num_cached_tokens == 0
    assert policy.level_of("shared") == policy.join_level(4) < policy.level_of("fresh")
    assert policy.level_of("fresh") == policy.join_level(44)
