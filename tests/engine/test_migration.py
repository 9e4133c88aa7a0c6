"""Staged live migration between two engines (torch on CPU, the tiny model), the engine
half of what the decode workers do: copy full blocks while the request keeps decoding,
then detach it, send the rest, commit on the destination. The continuation must equal an
uninterrupted run; an aborted final stage puts it back on the source, which continues
identically; and no block leaks on either side. Also with async scheduling on both
engines: stages are copied while an iteration is in flight, and the final detach first
applies it (the pending token moves with the request).
"""

from __future__ import annotations

import pytest

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.migration import MigrationInbox, StagePolicy, TransferId, plan_stage
from tandem.request_state import request_from_state, request_state
from tandem.request import RequestStatus, SamplingParams
from tandem.sched.cost_model import CostModel

BS = 16
PROMPTS = [[(7 * i + 3 * j) % 2000 + 1 for j in range(40 + 13 * i)] for i in range(3)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=77, max_tokens=40, ignore_eos=True)


def _engine(model_dir, cost_model, overlap=False):
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(block_size=BS, num_blocks=256),
            scheduler=SchedulerConfig(policy="mlfq", max_num_batched_tokens=128),
            cost_model_path=str(cost_model),  # a fixed one: no profiling at start-up
            async_scheduling=overlap,
        )
    )


def _drain(engine):
    while engine.has_unfinished_requests():
        engine.step()


def _baseline(model_dir, cost_model):
    e = _engine(model_dir, cost_model)
    reqs = [e.add_request(p, sp) for p, sp in zip(PROMPTS, (GREEDY, SEEDED, GREEDY), strict=True)]
    _drain(e)
    return [r.output_token_ids for r in reqs]


def _migrate(src, dst, rid, inbox, fail_final=False, states=None):
    """Stages as the decode workers run them; one engine step between two stages.
    ``states`` (a dict) receives the policy state the request was detached with."""
    policy = StagePolicy(final_blocks=1, max_stages=6, min_copy_stages=1)
    sent, index = 0, 0
    while True:
        req = src.scheduler.requests[rid]
        stage = plan_stage(policy, index, sent, req.num_computed_tokens, BS)
        tid = TransferId(rid, 1, index, stage.final)
        if not stage.final:
            payload = src.gather_request_blocks(rid, stage.start, stage.end)
            ids = inbox.reserve(tid, stage.num_blocks * BS, now=0.0)
            dst.runner.scatter_blocks(ids, payload)
            inbox.stage_done(tid, now=0.0)
            sent, index = stage.end, index + 1
            src.step()  # the request keeps decoding on the source meanwhile
            continue
        d = src.detach_request(rid, stage.start)
        assert rid not in src.scheduler.requests
        if states is not None:
            states[rid] = d.policy_state
        if fail_final:
            inbox.abort(rid)
            src.restore_detached(d)
            return src.scheduler.requests[rid]
        state = request_state(d.request, d.num_computed_tokens, d.policy_state)
        ids = inbox.reserve(tid, d.num_computed_tokens - stage.start * BS, now=0.0)
        request = request_from_state(state, 0.0)
        dst.commit_import(request, ids, d.payload, d.num_computed_tokens, d.policy_state)
        inbox.finish(tid)
        src.release_detached(d)
        return request


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_staged_migration_continues_exactly_and_an_aborted_one_stays_on_the_source(
    tiny_model_dirs, tmp_path, overlap
):
    model_dir, cost = tiny_model_dirs["llama"], tmp_path / "cost.json"
    CostModel().save(cost)
    want = _baseline(model_dir, cost)
    src, dst = _engine(model_dir, cost, overlap), _engine(model_dir, cost, overlap)
    inbox = MigrationInbox(dst.scheduler.device_kv, lease_s=30.0)
    params = (GREEDY, SEEDED, GREEDY)
    reqs = [src.add_request(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    for _ in range(15):
        src.step()
    level = src.scheduler.policy.describe(reqs[0])["level"]
    states: dict = {}
    first = _migrate(src, dst, reqs[0].request_id, inbox, states=states)
    assert first.status is RequestStatus.RUNNING and first is not reqs[0]
    # Its MLFQ queue travelled: the one it had when detached (the source ran it during the
    # copy stages, by wall-clock service, so it may have been demoted since ``level``).
    detached = states[first.request_id]["level"]
    assert dst.scheduler.policy.describe(first)["level"] == detached >= level
    second = _migrate(src, dst, reqs[1].request_id, inbox)  # seeded: same tokens elsewhere
    kept = _migrate(src, dst, reqs[2].request_id, inbox, fail_final=True)
    assert kept is reqs[2] and kept.status is RequestStatus.RUNNING
    assert src.scheduler.device_kv.audit().ok and dst.scheduler.device_kv.audit().ok
    _drain(src)
    _drain(dst)
    assert [first.output_token_ids, second.output_token_ids, kept.output_token_ids] == want
    assert inbox.committed == 2 and inbox.aborted == 1
    for kv in (src.scheduler.device_kv, dst.scheduler.device_kv):
        assert kv.pool.num_used == 0 and kv.audit().ok
