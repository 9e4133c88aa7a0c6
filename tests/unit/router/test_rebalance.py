"""The rebalancer's pairing decision (pure)."""

from __future__ import annotations

from router.rebalance import Candidate, WorkerLoad, blocks_for, pick_migration


def _w(name, demand, candidates=(), capacity=100):
    return WorkerLoad(name, capacity, demand, tuple(Candidate(r, b) for r, b in candidates))


def test_moves_from_the_most_to_the_least_used_the_request_that_best_closes_the_gap():
    loads = [_w("a", 60, [("small", 5), ("mid", 20), ("big", 50)]), _w("b", 10), _w("c", 30)]
    d = pick_migration(loads, min_gap=0.1)
    assert (d.source, d.dest, d.request_id) == ("a", "b", "mid")  # 0.5 gap -> 0.1
    assert d.gap_before == 0.5 and abs(d.gap_after - 0.1) < 1e-9


def test_no_move_below_the_gap_or_when_it_would_not_narrow_it():
    assert pick_migration([_w("a", 30, [("r", 5)]), _w("b", 25)], min_gap=0.1) is None
    # Moving the only candidate (40 blocks) turns a 0.3 gap into 0.5 the other way.
    assert pick_migration([_w("a", 50, [("r", 40)]), _w("b", 20)], min_gap=0.1) is None
    assert pick_migration([_w("a", 90)], min_gap=0.0) is None
    assert pick_migration([_w("a", 90), _w("b", 0)], min_gap=0.1) is None  # nothing movable


def test_the_destination_must_have_room_and_ties_go_to_the_smaller_request():
    full = _w("b", 95, capacity=100)
    assert pick_migration([_w("a", 100, [("r", 10)], capacity=400), full], 0.1) is None
    d = pick_migration([_w("a", 60, [("x", 26), ("y", 24)]), _w("b", 10)], min_gap=0.1)
    assert d.request_id == "y"  # both leave a 0.02 gap; 24 blocks are cheaper to move


def test_capacities_weigh_usage():
    # 40/200 = 0.2 vs 30/50 = 0.6: the small worker is the loaded one.
    d = pick_migration([_w("big", 40, [("p", 4)], 200), _w("small", 30, [("q", 10)], 50)], 0.1)
    assert (d.source, d.dest, d.request_id) == ("small", "big", "q")
    assert blocks_for(17, 16) == 2 and blocks_for(16, 16) == 1
