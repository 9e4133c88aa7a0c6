"""Async scheduling in the scheduler alone (pure: a fake device, no torch).

The engine launches iteration N+1 before it applies N's sampled ids: ``on_launched``
right after each ``schedule()``, ``update_from_output`` one iteration later. The fake
device plays the runner's part: a chunk token ``PLACEHOLDER_TOKEN`` is read from what the
previous launched iteration sampled for that request (as the runner reads its SAMPLED
row), and the "model" picks the next token from the last input token and its position
only, so a request's tokens are a function of its sequence. Then, on random workloads
with EOS stops, aborts, recompute and swap preemption and every policy:

- every request generates exactly the tokens it generates with synchronous stepping;
- no request is scheduled past its last token, a placeholder is always a chunk's only
  token and refers to the previous iteration, budgets hold, and nothing leaks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.config import CacheConfig, SchedulerConfig
from tandem.request import PLACEHOLDER_TOKEN, Request, RequestStatus, SamplingParams
from tandem.sched.output import RunnerOutput
from tandem.sched.scheduler import Scheduler
from tests.unit.sched.test_scheduler_properties import _check_queues, _policy

BLOCK = 4
EOS = 5


def _model(last: int, pos: int) -> int:
    return (last * 31 + pos * 7) % 11 + 1  # ids 1..11; EOS (5) comes up now and then


def _device(sched_out, previous: dict[str, int]) -> dict[str, int]:
    """The fake device: tokens sampled by this iteration, per request."""
    sampled = {}
    for c in sched_out.chunks:
        rid = c.request.request_id
        ids = list(c.token_ids)
        if PLACEHOLDER_TOKEN in ids:
            assert ids == [PLACEHOLDER_TOKEN], "a pending token is a chunk's only token"
            assert c.sample
            ids = [previous[rid]]  # KeyError: the previous iteration did not sample it
        if c.sample:
            sampled[rid] = _model(ids[-1], c.start_pos + c.num_tokens)
    return sampled


def _run(reqs, *, overlap, policy_name, budget, max_seqs, num_blocks, host_blocks, aborts):
    clock = [0.0]
    s = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_seqs,
            max_num_batched_tokens=budget,
            preemption_mode="swap" if host_blocks else "recompute",
        ),
        CacheConfig(block_size=BLOCK, num_blocks=num_blocks, num_host_blocks=host_blocks),
        policy=_policy(policy_name),
        clock=lambda: clock[0],
    )
    made = []
    for i, (plen, max_tokens, prio, ignore_eos) in enumerate(reqs):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        r = Request(f"r{i}", [2 + i % 9] * plen, params, 0.0, priority=prio, eos_token_ids=(EOS,))
        s.add_request(r)
        made.append(r)
    in_flight = None
    previous: dict[str, int] = {}
    for it in range(3000):
        for rid in aborts.get(it, ()):
            s.abort(rid)
        if not s.requests and in_flight is None:
            break
        out = s.schedule()
        assert out.num_batched_tokens <= budget and len(out.chunks) <= max_seqs
        for c in out.chunks:
            r = c.request
            assert r.num_output_tokens + r.num_pending_tokens < r.sampling_params.max_tokens
            assert len(c.block_table) * BLOCK >= c.start_pos + c.num_tokens
        clock[0] += 0.01
        sampled = _device(out, previous)
        if overlap:
            s.on_launched(out)
            previous = sampled
            if in_flight is not None:
                s.update_from_output(*in_flight, seconds=0.01)
            in_flight = (out, RunnerOutput(sampled=sampled)) if not out.is_empty else None
        else:
            s.update_from_output(out, RunnerOutput(sampled=sampled), seconds=0.01)
        _check_queues(s)
        assert s.device_kv.audit().ok
        assert s.host_kv is None or s.host_kv.audit().ok
    assert not s.requests, "the scheduler stopped making progress"
    assert all(r.num_pending_tokens == 0 for r in made)
    assert s.device_kv.num_free_blocks == num_blocks
    assert s.host_kv is None or s.host_kv.num_free_blocks == host_blocks
    return {r.request_id: (r.output_token_ids, r.status) for r in made}


@pytest.mark.parametrize("policy_name", ["fcfs", "mlfq", "alise"])
@settings(max_examples=60, deadline=None)
@given(
    reqs=st.lists(
        # prompt len, max_tokens, priority class, ignore_eos
        st.tuples(st.integers(1, 40), st.integers(1, 16), st.integers(0, 1), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    budget=st.integers(4, 40),
    max_seqs=st.integers(1, 6),
    num_blocks=st.integers(14, 40),  # 14 = the largest request's need (56 tokens)
    host_blocks=st.sampled_from([0, 32]),
    abort_at=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 7)), max_size=3),
)
def test_overlap_generates_exactly_the_synchronous_tokens(
    policy_name, reqs, budget, max_seqs, num_blocks, host_blocks, abort_at
):
    aborts: dict[int, list[str]] = {}
    for it, i in abort_at:
        if i < len(reqs):
            aborts.setdefault(it, []).append(f"r{i}")
    kw = dict(policy_name=policy_name, budget=budget, max_seqs=max_seqs,
              num_blocks=num_blocks, host_blocks=host_blocks)  # fmt: skip
    if aborts:  # an abort lands at a different point of a request's life in each mode:
        _run(reqs, overlap=True, aborts=aborts, **kw)  # only the invariants are compared
        return
    sync = _run(reqs, overlap=False, aborts={}, **kw)
    assert _run(reqs, overlap=True, aborts={}, **kw) == sync


def test_a_request_preempted_while_its_token_is_pending_keeps_that_token():
    """Recompute preemption between launch and apply: the pending token is appended to
    the waiting request, which later recomputes over it and continues exactly."""
    cfg = dict(policy_name="fcfs", budget=8, max_seqs=4, host_blocks=0, aborts={})
    reqs = [(12, 16, 0, True), (12, 16, 0, True), (12, 16, 0, True)]
    roomy = _run(reqs, overlap=False, num_blocks=64, **cfg)
    tight = _run(reqs, overlap=True, num_blocks=14, **cfg)
    assert tight == roomy
    assert all(status is RequestStatus.FINISHED_LENGTH for _, status in tight.values())
