"""Property tests of the policy contracts (issue 15): strict priority classes, bounded wait,
FCFS inside an mlfq level, alise's prediction conditioned on tokens generated (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.request import Request, RequestStatus, SamplingParams
from tandem.sched.alise import ALISEPolicy
from tandem.sched.cost_model import CostModel
from tandem.sched.mlfq import MLFQPolicy
from tandem.sched.policy import make_policy
from tandem.sched.predictor import OutputLengthPredictor

COST = CostModel(
    prefill_base=0.0,
    prefill_per_token=0.001,
    prefill_per_token_sq=0.0,
    decode_base=0.01,
    decode_per_seq=0.0,
    decode_per_ctx_token=0.0,
)
STEP = 0.01  # seconds per simulated iteration


def _req(i: int, plen: int, prio: int, arrival: float, max_tokens: int) -> Request:
    ids = [(i * 7 + k) % 50 + 1 for k in range(plen)]
    return Request(f"r{i}", ids, SamplingParams(max_tokens=max_tokens), arrival, priority=prio)


jobs = st.lists(
    st.tuples(
        st.integers(1, 300),  # prompt length
        st.integers(0, 2),  # priority class
        st.integers(0, 20),  # arrival step
        st.integers(1, 60),  # output length
    ),
    min_size=1,
    max_size=12,
)


def _policy(name: str, limit: float):
    if name == "mlfq":
        return MLFQPolicy(COST, q0=0.02, num_levels=5, starvation_limit=limit)
    if name == "alise":
        pred = OutputLengthPredictor(min_history=2, k=2)
        for n in (3, 40, 5, 90):
            pred.observe([n, n + 1, n + 2], n)
        return ALISEPolicy(COST, predictor=pred, starvation_limit=limit)
    return make_policy(name)


def _run(name: str, spec, limit: float, batch: int, check):
    """Batch-``batch`` machine: each step runs the ``batch`` first requests in the policy's
    order for one token. ``check(policy, live, now)`` runs before every step."""
    policy = _policy(name, limit)
    reqs = [_req(i, p, c, a * STEP, o) for i, (p, c, a, o) in enumerate(spec)]
    pending = sorted(reqs, key=lambda r: r.arrival_time)
    live: list[Request] = []
    last = {}
    gaps: dict[str, float] = {r.request_id: 0.0 for r in reqs}
    now = 0.0
    for _ in range(10_000):
        while pending and pending[0].arrival_time <= now + 1e-12:
            r = pending.pop(0)
            policy.on_arrival(r, now)
            live.append(r)
            last[r.request_id] = r.arrival_time
        if not live and not pending:
            break
        if not live:
            now = pending[0].arrival_time
            continue
        policy.before_schedule(live, now)
        check(policy, live, now)
        picked = sorted(live, key=lambda r: policy.sort_key(r, now))[:batch]
        now += STEP
        for r in picked:
            r.output_token_ids.append(7)
            r.num_computed_tokens = r.num_tokens - 1
            policy.on_service(r, 1, STEP, now)
            gaps[r.request_id] = max(gaps[r.request_id], now - STEP - last[r.request_id])
            last[r.request_id] = now
            if r.num_output_tokens >= r.sampling_params.max_tokens:
                r.status = RequestStatus.FINISHED_LENGTH
                policy.on_finish(r)
                live.remove(r)
    assert not live and not pending, "a request was never finished"
    return gaps


@settings(max_examples=60, deadline=None)
@given(jobs, st.sampled_from(["fcfs", "mlfq", "alise"]))
def test_priority_classes_are_strict_in_every_state(spec, name):
    def check(policy, live, now):
        keys = sorted(live, key=lambda r: policy.sort_key(r, now))
        classes = [r.priority for r in keys]
        assert classes == sorted(classes), (name, classes)

    _run(name, spec, limit=0.05, batch=2, check=check)


@settings(max_examples=60, deadline=None)
@given(jobs.map(lambda js: [(p, 0, a, o) for p, _, a, o in js]), st.sampled_from(["mlfq", "alise"]))
def test_wait_is_bounded_by_the_starvation_limit(spec, name):
    """One class, batch 1: no request goes unserved longer than the starvation limit plus
    one step per other request (those ahead of it once it is promoted: each runs at most
    one quantum of q0 = 2 steps in mlfq, one step in alise before losing its own starved
    mark), plus the step in which promotion is noticed."""
    limit = 1.0
    gaps = _run(name, spec, limit=limit, batch=1, check=lambda *_: None)
    per_other = 3 * STEP if name == "mlfq" else STEP
    bound = limit + len(spec) * per_other + 2 * STEP
    assert max(gaps.values()) <= bound + 1e-9, (gaps, bound)


@settings(max_examples=60, deadline=None)
@given(jobs.map(lambda js: [(p, 0, a, o) for p, _, a, o in js]))
def test_mlfq_is_fcfs_inside_each_level(spec):
    def check(policy, live, now):
        ordered = sorted(live, key=lambda r: policy.sort_key(r, now))
        by_level: dict[int, list[Request]] = {}
        for r in ordered:
            by_level.setdefault(policy.level_of(r.request_id), []).append(r)
        for level, members in by_level.items():
            ranks = [policy._state[r.request_id].arrival_rank for r in members]
            assert ranks == sorted(ranks), (level, ranks)

    _run("mlfq", spec, limit=0.05, batch=2, check=check)


def test_alise_conditions_the_prediction_on_tokens_generated():
    pred = OutputLengthPredictor(min_history=1, k=4)
    for n in (4, 6, 200, 400):
        pred.observe([1, 2, 3], n)
    p = ALISEPolicy(COST, predictor=pred, starvation_limit=100)
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=1000), 0.0)
    p.on_arrival(r, 0.0)
    assert p.describe(r)["predicted_output"] == 103.0  # median of 4, 6, 200, 400
    r.output_token_ids.extend([7] * 10)  # outlived the short neighbours
    p.on_service(r, 1, STEP, 0.1)
    assert p.describe(r)["predicted_output"] == 300.0  # median of 200, 400
    r.output_token_ids.extend([7] * 400)  # outlived every neighbour: growth
    p.on_service(r, 1, STEP, 0.2)
    assert p.describe(r)["predicted_output"] > 410
    r.status = RequestStatus.FINISHED_LENGTH
    p.on_finish(r)
    err = p.prediction_error()
    assert err["count"] == 1 and abs(err["mean_relative_error"] - abs(103 - 410) / 410) < 1e-9
