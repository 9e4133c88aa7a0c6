"""Proactive offload and prefetch (pure): the planner's rules, and the scheduler applying them.

The scheduler-level invariants that matter to the runner (an offload or prefetch never
touches a block of the batch it ships with; swap-ins and swap-outs never share an
iteration; hysteresis) are also checked on random workloads in test_scheduler_properties.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.config import CacheConfig, SchedulerConfig
from tandem.request import Request, RequestStatus, SamplingParams
from tandem.sched.mlfq import MLFQPolicy
from tandem.sched.offload import Candidate, OffloadPlanner, watermark_blocks
from tandem.sched.output import RunnerOutput
from tandem.sched.policy import make_policy
from tandem.sched.scheduler import Scheduler

BLOCK = 4


def _run(s: Scheduler, out) -> None:
    runner = RunnerOutput()
    for c in out.chunks:
        if c.sample:
            runner.sampled[c.request.request_id] = 5
    s.update_from_output(out, runner, seconds=0.0)


def _req(rid: str, prompt: int, max_tokens: int, priority: int = 0, t: float = 0.0) -> Request:
    # A token of its own per request: no two share a cached prefix (these tests count blocks).
    token = 3 + sum(map(ord, rid))
    return Request(
        rid, [token] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), t, priority
    )


# ---------------------------------------------------------------- planner (pure rules)


@given(st.floats(0.0, 0.999), st.integers(1, 10_000))
def test_watermark_is_the_ceiling_of_the_fraction(fraction, n):
    w = watermark_blocks(fraction, n)
    assert w >= fraction * n - 1e-6 and w - 1 < fraction * n
    assert watermark_blocks(0.05, 100) == 5 and watermark_blocks(0.05, 4) == 1


def test_watermark_rejects_a_non_fraction():
    with pytest.raises(ValueError):
        watermark_blocks(1.0, 10)


candidates = st.lists(
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.booleans()), max_size=10
).map(lambda xs: [(Candidate(f"r{i}", d, h), p) for i, (d, h, p) in enumerate(xs)])


@settings(max_examples=300)
@given(
    cands=candidates,
    free=st.integers(0, 40),
    host_free=st.integers(0, 40),
    fraction=st.floats(0.0, 0.9),
    hysteresis=st.integers(0, 5),
)
def test_offload_frees_exactly_up_to_the_watermark(cands, free, host_free, fraction, hysteresis):
    planner = OffloadPlanner(fraction, 40, hysteresis)
    now = 10
    for cand, protected in cands:
        if protected:
            planner.note_swap_in(cand.request_id, now - max(hysteresis - 1, 0))
    tail_first = [c for c, _ in cands]
    victims = planner.plan_offload(tail_first, free, host_free, now)
    by_id = {c.request_id: c for c in tail_first}
    if free >= planner.watermark:
        assert victims == []
        return
    # Victims keep the tail-first order, skip protected ones and never overflow the host.
    positions = [tail_first.index(by_id[v]) for v in victims]
    assert positions == sorted(positions)
    assert not any(planner.protected(v, now) for v in victims)
    assert sum(by_id[v].host_blocks for v in victims) <= host_free
    freed = sum(by_id[v].device_blocks for v in victims)
    if victims:  # minimal: without the last victim it would still be below the watermark
        assert free + freed - by_id[victims[-1]].device_blocks < planner.watermark
    if free + freed < planner.watermark:  # it stopped short only for want of candidates
        host_left = host_free
        for c in tail_first:
            if c.request_id in victims:
                host_left -= c.host_blocks
            else:
                assert planner.protected(c.request_id, now) or c.host_blocks > host_left


@settings(max_examples=300)
@given(cands=candidates, free=st.integers(0, 40), fraction=st.floats(0.01, 0.9))
def test_prefetch_never_dips_below_the_watermark_and_never_skips(cands, free, fraction):
    planner = OffloadPlanner(fraction, 40, hysteresis=0)
    in_order = [c for c, _ in cands]
    picked = planner.plan_prefetch(in_order, free)
    assert picked == [c.request_id for c in in_order[: len(picked)]], "not a prefix"
    left = free - sum(c.device_blocks for c in in_order[: len(picked)])
    assert not picked or left >= planner.watermark
    if len(picked) < len(in_order):
        assert left - in_order[len(picked)].device_blocks < planner.watermark


def test_hysteresis_protects_for_exactly_n_iterations():
    planner = OffloadPlanner(0.5, 10, hysteresis=3)
    planner.note_swap_in("a", 7)
    assert [planner.protected("a", i) for i in (7, 8, 9, 10)] == [True, True, True, False]
    assert planner.plan_offload([Candidate("a", 4, 4)], 0, 10, 9) == []
    assert planner.plan_offload([Candidate("a", 4, 4)], 0, 10, 10) == ["a"]
    planner.forget("a")
    assert not planner.protected("a", 8)


# ---------------------------------------------------------------- scheduler applies them


def _mlfq_scheduler(num_blocks: int, watermark: float, policy) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=2,
            max_num_batched_tokens=64,
            preemption_mode="swap",
            swap_watermark=watermark,
            policy=policy.name,
        ),
        CacheConfig(block_size=BLOCK, num_blocks=num_blocks, num_host_blocks=64),
        policy=policy,
        clock=lambda: 0.0,
    )


def _two_idle_residents(s: Scheduler, state_a: dict, state_b: dict):
    """a and b run, then get the given policy state; two new requests take the batch.

    16 blocks, watermark 4: a and b hold 4 blocks each, the newcomers 3 each, so 2 are
    free after the newcomers' prefill and exactly one of a, b must go to the host.
    """
    a, b = _req("a", 12, 50), _req("b", 12, 50)
    s.add_request(a)
    s.add_request(b)
    for _ in range(2):
        out = s.schedule()
        assert not out.offload
        _run(s, out)
    s.policy.restore(a, state_a, 0.0)
    s.policy.restore(b, state_b, 0.0)
    s.add_request(_req("c", 12, 50))
    s.add_request(_req("d", 12, 50))
    out = s.schedule()
    assert {c.request.request_id for c in out.chunks} == {"c", "d"}
    return out


@pytest.mark.parametrize("lowest", ["a", "b"])
def test_mlfq_offloads_the_back_of_the_lowest_queue(lowest):
    s = _mlfq_scheduler(16, 0.25, MLFQPolicy(q0=1.0, num_levels=4, skip_join=False))
    other = "b" if lowest == "a" else "a"
    levels = {lowest: {"level": 3}, other: {"level": 2}}
    out = _two_idle_residents(s, levels["a"], levels["b"])
    assert not out.swap_out and not out.preempted, "the newcomers fit: no preemption"
    assert len(out.offload) == 1
    assert s.requests[lowest].status is RequestStatus.SWAPPED
    assert s.requests[other].status is RequestStatus.RUNNING
    assert s.swap.proactive_outs == 1 and s.device_kv.num_free_blocks >= 4


def test_mlfq_offloads_the_later_of_two_in_the_same_queue():
    s = _mlfq_scheduler(16, 0.25, MLFQPolicy(q0=1.0, num_levels=4, skip_join=False))
    out = _two_idle_residents(s, {"level": 3}, {"level": 3})  # b joined queue 3 after a
    assert len(out.offload) == 1 and s.requests["b"].status is RequestStatus.SWAPPED


@pytest.mark.parametrize("longest", ["a", "b"])
def test_alise_offloads_the_longest_estimated_time_to_run(longest):
    policy = make_policy("alise", starvation_limit=60.0)
    s = _mlfq_scheduler(16, 0.25, policy)
    other = "b" if longest == "a" else "a"
    # The newcomers predict the prior (128 tokens), so both a and b rank behind them.
    pred = {longest: {"predicted_output": 5000.0}, other: {"predicted_output": 1000.0}}
    _two_idle_residents(s, pred["a"], pred["b"])
    assert s.requests[longest].status is RequestStatus.SWAPPED
    assert s.requests[other].status is RequestStatus.RUNNING


def test_no_proactive_offload_without_watermark_or_host_tier():
    s = _mlfq_scheduler(16, 0.0, MLFQPolicy(q0=1.0, num_levels=4, skip_join=False))
    out = _two_idle_residents(s, {"level": 3}, {"level": 2})
    assert not out.offload and s.swap.proactive_outs == 0


def _prefetch_setup(watermark: float, waiting_ahead: bool = False) -> tuple[Scheduler, object]:
    """low goes to the host (offloaded: big fills the device) while a big request runs
    and finishes at once; then small takes the only batch slot, and low runs next."""
    s = Scheduler(
        SchedulerConfig(
            max_num_seqs=1,
            max_num_batched_tokens=64,
            preemption_mode="swap",
            swap_watermark=watermark,
            policy="fcfs",
        ),
        CacheConfig(block_size=BLOCK, num_blocks=16, num_host_blocks=64),
        clock=lambda: 0.0,
    )
    s.add_request(_req("low", 12, 50, priority=1))
    _run(s, s.schedule())
    s.add_request(_req("big", 52, 1, priority=0))
    out = s.schedule()
    assert out.offload and s.requests["low"].status is RequestStatus.SWAPPED
    assert not out.prefetch, "prefetch in an iteration that swapped out"
    _run(s, out)
    assert "big" not in s.requests
    s.add_request(_req("small", 4, 20, priority=0))
    if waiting_ahead:
        s.add_request(_req("small2", 4, 20, priority=0, t=1.0))
    out = s.schedule()
    assert [c.request.request_id for c in out.chunks] == ["small"]
    return s, out


def test_prefetch_brings_back_the_next_request_above_the_watermark():
    s, out = _prefetch_setup(0.25)
    assert len(out.prefetch) == 1 and not out.swap_in and not out.swaps_out
    low = s.requests["low"]
    assert low.status is RequestStatus.RUNNING
    assert set(out.prefetch[0].dst).isdisjoint(out.chunks[0].block_table)
    assert s.device_kv.num_free_blocks >= s.offload.watermark
    assert s.swap.prefetches == 1
    # Idle now but protected by hysteresis and above the watermark: it stays resident.
    _run(s, out)
    out = s.schedule()
    assert not out.offload and low.status is RequestStatus.RUNNING


def test_no_prefetch_that_would_dip_below_the_watermark():
    s, out = _prefetch_setup(0.8)  # 13 of 16 blocks must stay free
    assert not out.prefetch and s.requests["low"].status is RequestStatus.SWAPPED


def test_no_prefetch_past_a_waiting_request():
    s, out = _prefetch_setup(0.25, waiting_ahead=True)
    assert not out.prefetch and s.requests["low"].status is RequestStatus.SWAPPED
