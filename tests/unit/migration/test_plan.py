"""Stage planning, stage transfer ids and fault points of a live migration (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem.migration import Fault, Stage, StagePolicy, TransferId, plan_stage
from tandem.migration.plan import wants_block

BS = 16


def test_copy_stages_send_full_blocks_then_the_final_stage_sends_the_rest():
    policy = StagePolicy(final_blocks=1, max_stages=8)
    # 100 tokens: 6 full blocks + a partial one.
    assert plan_stage(policy, 0, 0, 100, BS) == Stage(0, 0, 6, final=False)
    # 20 more tokens decoded meanwhile: block 6 filled, block 7 partial (2 unsent > 1).
    assert plan_stage(policy, 1, 6, 120, BS) == Stage(1, 6, 7, final=False)
    # Only the partial block is unsent: stop and copy it (with the request's state).
    assert plan_stage(policy, 2, 7, 125, BS) == Stage(2, 7, 8, final=True)


def test_final_when_nothing_new_filled_or_at_the_stage_limit():
    assert plan_stage(StagePolicy(final_blocks=0), 1, 6, 100, BS).final  # no new full block
    limit = StagePolicy(final_blocks=0, max_stages=2)
    assert plan_stage(limit, 1, 2, 200, BS) == Stage(1, 2, 13, final=True)
    assert plan_stage(StagePolicy(max_stages=1), 0, 0, 400, BS).final  # no copy stage at all
    assert plan_stage(StagePolicy(), 0, 0, 10, BS) == Stage(0, 0, 1, final=True)  # < 1 block


def test_min_copy_stages_holds_the_final_stage_back_and_waits_for_a_block():
    policy = StagePolicy(final_blocks=4, max_stages=8, min_copy_stages=2)
    assert plan_stage(policy, 0, 0, 40, BS) == Stage(0, 0, 2, final=False)
    assert wants_block(policy, 1, 2, 40, BS)  # nothing new yet: wait
    assert not wants_block(policy, 1, 2, 48, BS)
    assert plan_stage(policy, 1, 2, 48, BS) == Stage(1, 2, 3, final=False)
    assert not wants_block(policy, 2, 3, 48, BS)  # enough copy stages
    assert plan_stage(policy, 2, 3, 48, BS).final


def test_sent_blocks_must_still_be_full():
    with pytest.raises(ValueError, match="full blocks"):
        plan_stage(StagePolicy(), 1, 5, 40, BS)


@pytest.mark.parametrize(
    "kwargs", [{"final_blocks": -1}, {"max_stages": 0}, {"max_stages": 2, "min_copy_stages": 2}]
)
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        StagePolicy(**kwargs)


@given(
    final_blocks=st.integers(0, 4),
    max_stages=st.integers(1, 6),
    start_tokens=st.integers(1, 400),
    growth=st.lists(st.integers(0, 40), min_size=6, max_size=6),
)
def test_stages_cover_every_block_once_in_order_within_the_limit(
    final_blocks, max_stages, start_tokens, growth
):
    policy = StagePolicy(final_blocks=final_blocks, max_stages=max_stages)
    n, sent, stages = start_tokens, 0, []
    for index in range(max_stages):
        stage = plan_stage(policy, index, sent, n, BS)
        assert stage.start == sent and stage.end >= stage.start
        stages.append(stage)
        sent = stage.end
        if stage.final:
            break
        assert stage.num_blocks >= 1 and stage.end == n // BS  # copy stages: full blocks only
        n += growth[index]
    assert stages[-1].final and len(stages) <= max_stages
    assert stages[-1].end == -(-n // BS)  # the final stage ends with the last token's block


def test_transfer_ids_round_trip_and_plain_ids_are_not_migrations():
    for rid in ("cmpl-abc", "cmpl-abc~2", "a|b"):
        for stage in (Stage(0, 0, 3, False), Stage(4, 3, 5, True)):
            tid = TransferId.of(rid, 7, stage)
            assert TransferId.parse(str(tid)) == tid
    assert str(TransferId("r", 3, 2, True)) == "r|mig3.2f"
    for plain in ("cmpl-abc", "x|mig", "x|migA.1", "x|mig1.", "|mig1.0", "x|mig1.2g"):
        assert TransferId.parse(plain) is None


def test_faults_parse_and_fire_at_their_point_only():
    assert Fault.parse(None) is None and Fault.parse("") is None
    first, middle = Fault.parse("source:first"), Fault.parse("dest:middle")
    assert first.hits("source", 0, False) and not first.hits("source", 1, False)
    assert not first.hits("dest", 0, False) and not first.hits("source", 0, True)
    assert middle.hits("dest", 1, False) and middle.hits("dest", 3, False)
    assert not middle.hits("dest", 0, False) and not middle.hits("dest", 2, True)
    final, commit = Fault("dest", "final"), Fault("dest", "commit")
    assert final.hits("dest", 2, True) and not final.hits("dest", 2, True, "commit")
    assert commit.hits("dest", 2, True, "commit") and not commit.hits("dest", 2, True)
    for bad in ("source", "up:first", "dest:later", "source:commit"):
        with pytest.raises(ValueError):
            Fault.parse(bad)
