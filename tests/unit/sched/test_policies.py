"""Each policy rule on its own, with a hand-driven clock (pure)."""

from __future__ import annotations

import pytest

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


def req(
    rid: str, plen: int = 4, prio: int = 0, arrival: float = 0.0, max_tokens: int = 100
) -> Request:
    return Request(
        rid, list(range(1, plen + 1)), SamplingParams(max_tokens=max_tokens), arrival, priority=prio
    )


def order(policy, reqs, now=0.0):
    return [r.request_id for r in sorted(reqs, key=lambda r: policy.sort_key(r, now))]


def test_skip_join_picks_first_queue_whose_quantum_covers_prefill():
    p = MLFQPolicy(COST, q0=0.1, num_levels=6)
    # prefill estimate = 1 ms per token: 50 tokens -> 0.05 s -> queue 0; 150 -> 0.15 -> 1; 700 -> 0.7 -> 3
    assert [p.join_level(n) for n in (50, 100, 150, 400, 700, 10**6)] == [0, 0, 1, 2, 3, 5]
    classic = MLFQPolicy(COST, q0=0.1, skip_join=False)
    assert classic.join_level(10**6) == 0


def test_mlfq_fifo_within_queue_and_demotion_to_front():
    p = MLFQPolicy(COST, q0=0.1, num_levels=4, starvation_limit=100, order="fastserve")
    a, b, c = req("a"), req("b"), req("c")
    for r in (a, b, c):
        p.on_arrival(r, 0.0)
    assert order(p, [c, b, a]) == ["a", "b", "c"]
    p.on_service(a, 1, 0.05, 1.0)
    assert p.level_of("a") == 0  # below quantum
    p.on_service(a, 1, 0.05, 1.1)
    assert p.level_of("a") == 1 and p.demotions == 1
    d = req("d")
    p.on_arrival(d, 2.0)
    assert order(p, [a, b, c, d]) == ["b", "c", "d", "a"]
    # b demoted later still goes to the *front* of queue 1, ahead of a.
    p.on_service(b, 1, 0.1, 2.0)
    assert order(p, [a, b]) == ["b", "a"]
    # Queue 1's quantum is 0.2 s.
    p.on_service(b, 1, 0.19, 2.1)
    assert p.level_of("b") == 1
    p.on_service(b, 1, 0.01, 2.2)
    assert p.level_of("b") == 2


def test_mlfq_starvation_promotes_to_top_queue():
    p = MLFQPolicy(COST, q0=0.1, num_levels=4, starvation_limit=5.0)
    a, b = req("a"), req("b")
    p.on_arrival(a, 0.0)
    p.on_arrival(b, 0.0)
    for t in range(3):
        p.on_service(a, 1, 0.2, float(t))
    assert p.level_of("a") >= 1
    p.before_schedule([a, b], now=4.0)
    assert p.level_of("a") >= 1
    p.before_schedule([a, b], now=8.5)  # a last served at t=2: waited 6.5 s > 5 s
    assert p.level_of("a") == 0 and p.promotions == 1


def test_priority_class_orders_above_every_policy():
    for name in ("fcfs", "mlfq", "alise"):
        p = make_policy(name, cost_model=COST)
        low = req("low", plen=1, prio=2, arrival=0.0)
        high = req("high", plen=1000, prio=0, arrival=5.0)
        for r in (low, high):
            p.on_arrival(r, r.arrival_time)
        assert order(p, [low, high], now=6.0) == ["high", "low"], name


def test_alise_orders_by_predicted_remaining_time_and_grows_on_overrun():
    pred = OutputLengthPredictor(min_history=2, k=1)
    # Template A (tokens 1..) finishes short, template B (tokens 500..) finishes long.
    for _ in range(4):
        pred.observe(list(range(1, 20)), 5)
        pred.observe(list(range(500, 519)), 400)
    p = ALISEPolicy(COST, predictor=pred, starvation_limit=100)
    long_req = Request("long", list(range(500, 519)), SamplingParams(max_tokens=1000), 0.0)
    short_req = Request("short", list(range(1, 20)), SamplingParams(max_tokens=1000), 1.0)
    for r in (long_req, short_req):
        p.on_arrival(r, r.arrival_time)
    assert order(p, [long_req, short_req]) == ["short", "long"]
    # The short one overruns its prediction: its estimate doubles, it is not starved.
    short_req.output_token_ids.extend([7] * 5)
    p.on_service(short_req, 1, 0.01, 2.0)
    assert p.describe(short_req)["predicted_output"] == pytest.approx(10.0)


def test_alise_starvation_guard_and_learning_from_finished():
    p = ALISEPolicy(COST, predictor=OutputLengthPredictor(min_history=1, k=1), starvation_limit=1.0)
    slow = Request("slow", [9] * 50, SamplingParams(max_tokens=100), 0.0)
    quick = Request("quick", [3], SamplingParams(max_tokens=100), 0.0)
    p.predictor.observe([9] * 50, 1000)
    p.predictor.observe([3], 2)
    for r in (slow, quick):
        p.on_arrival(r, 0.0)
    assert order(p, [slow, quick], 0.5) == ["quick", "slow"]
    p.on_service(quick, 1, 0.01, 1.5)
    p.before_schedule([slow, quick], now=2.0)  # slow never served since t=0
    assert order(p, [slow, quick], 2.0) == ["slow", "quick"]
    quick.output_token_ids.extend([1, 2])
    quick.status = RequestStatus.FINISHED_STOPPED
    before = p.predictor._count
    p.on_finish(quick)
    assert p.predictor._count == before + 1


def test_predictor_prior_then_neighbours():
    pred = OutputLengthPredictor(min_history=3, prior=50.0, k=2)
    assert pred.predict([1, 2, 3]) == 50.0
    for _ in range(3):
        pred.observe([1, 2, 3, 4], 10)
        pred.observe([100, 200, 300, 400], 900)
    assert pred.predict([1, 2, 3, 4, 5]) == pytest.approx(10.0)
    assert pred.predict([100, 200, 300, 400]) == pytest.approx(900.0)


def test_cost_model_fit_recovers_coefficients_and_round_trips(tmp_path):
    true = CostModel(0.002, 3e-5, 1e-9, 0.004, 2e-4, 5e-8)
    pre = [(n, true.prefill_time(n)) for n in (16, 64, 256, 1024, 4096)]
    dec = [
        (b, c, true.decode_time(b, c))
        for b, c in ((1, 100), (8, 4000), (32, 20000), (64, 60000), (4, 500))
    ]
    fit = CostModel.fit(pre, dec)
    for n in (32, 2000):
        assert fit.prefill_time(n) == pytest.approx(true.prefill_time(n), rel=1e-3)
    assert fit.decode_time(16, 9000) == pytest.approx(true.decode_time(16, 9000), rel=1e-3)
    path = tmp_path / "cost.json"
    fit.save(path)
    assert CostModel.load(path) == fit
    with pytest.raises(ValueError, match="must be a number >= 0"):
        CostModel(prefill_base=-1.0)
    (tmp_path / "bad.json").write_text('{"nope": 1}')
    with pytest.raises(ValueError, match="unknown cost model fields"):
        CostModel.load(tmp_path / "bad.json")


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy 'lifo'"):
        make_policy("lifo")
