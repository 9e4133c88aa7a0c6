"""Moving requests whose blocks are shared through the prefix cache (torch on CPU, the tiny
Llama): export/import (handoff) and staged live migration of one request of a group that
shares a cached prefix. The moved request continues exactly, the ones left behind keep
reading their shared blocks intact, the destination caches what it received, and no
block leaks on either side."""

from __future__ import annotations

import random

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.migration import MigrationInbox
from tandem.request import SamplingParams
from tandem.sched.cost_model import CostModel
from tests.engine.test_migration import _migrate

BS = 16
_rng = random.Random(5)
SYSTEM = [_rng.randrange(8, 2000) for _ in range(70)]  # 4 full blocks + 6 tokens
PROMPTS = [SYSTEM + [_rng.randrange(8, 2000) for _ in range(5 + 9 * i)] for i in range(3)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


def _engine(model_dir, cost, caching=True):
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            cache=CacheConfig(block_size=BS, num_blocks=128, enable_prefix_caching=caching),
            scheduler=SchedulerConfig(policy="mlfq", max_num_batched_tokens=128),
            cost_model_path=str(cost),
        )
    )


def _drain(*engines):
    for e in engines:
        while e.has_unfinished_requests():
            e.step()


def _warm(engine):
    """Cache the system prompt, then start the three requests that share it."""
    warm = engine.add_request(SYSTEM + [9, 9], SamplingParams(max_tokens=1))
    _drain(engine)
    assert warm.is_finished
    reqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    for _ in range(4):
        engine.step()
    assert all(r.num_cached_tokens == 64 for r in reqs)
    shared = engine.scheduler.device_kv.block_table(reqs[0].request_id)[:4]
    assert all(engine.scheduler.device_kv.pool.refcount(b) == 3 for b in shared)
    return reqs


def _clean(*engines):
    for e in engines:
        kv = e.scheduler.device_kv
        assert kv.pool.num_used == 0 and kv.audit().ok and kv.num_free_blocks == kv.num_blocks


def test_export_import_of_a_request_sharing_its_prefix(tiny_llama_dir, tmp_path):
    cost = tmp_path / "cost.json"
    CostModel().save(cost)
    base = _engine(tiny_llama_dir, cost, caching=False)
    want = [base.add_request(p, GREEDY) for p in PROMPTS]
    _drain(base)
    src, dst = _engine(tiny_llama_dir, cost), _engine(tiny_llama_dir, cost)
    reqs = _warm(src)
    moved = src.export_request(reqs[1].request_id)
    shared = src.scheduler.device_kv.block_table(reqs[0].request_id)[:4]
    assert all(src.scheduler.device_kv.pool.refcount(b) == 2 for b in shared)
    got = dst.import_request(moved)
    # The destination names the full blocks it received: a later request there hits them.
    assert dst.scheduler.device_kv.num_cached_blocks >= 4
    _drain(src, dst)
    late = dst.add_request(PROMPTS[1][:64] + [3, 3], SamplingParams(max_tokens=1))
    _drain(dst)
    assert late.num_cached_tokens == 64
    assert [reqs[0].output_token_ids, got.output_token_ids, reqs[2].output_token_ids] == [
        r.output_token_ids for r in want
    ]
    _clean(src, dst)


def test_staged_migration_of_a_request_sharing_its_prefix(tiny_llama_dir, tmp_path):
    cost = tmp_path / "cost.json"
    CostModel().save(cost)
    base = _engine(tiny_llama_dir, cost, caching=False)
    want = [base.add_request(p, GREEDY) for p in PROMPTS]
    _drain(base)
    src, dst = _engine(tiny_llama_dir, cost), _engine(tiny_llama_dir, cost)
    reqs = _warm(src)
    inbox = MigrationInbox(dst.scheduler.device_kv, lease_s=30.0)
    moved = _migrate(src, dst, reqs[0].request_id, inbox)
    kept = _migrate(src, dst, reqs[2].request_id, inbox, fail_final=True)
    assert kept is reqs[2]
    _drain(src, dst)
    assert [moved.output_token_ids, reqs[1].output_token_ids, kept.output_token_ids] == [
        r.output_token_ids for r in want
    ]
    assert src.scheduler.device_kv.num_cached_blocks >= 4  # the prefix stays cached there
    _clean(src, dst)


def _migrate_sharing(src, dst, rid, inbox):
    """``_migrate`` (copy stages, then the final stage) where stage 0 shares the blocks the
    destination has cached, as ``decode_worker.migration_in.reserve_cached`` does."""
    from tandem.migration import StagePolicy, TransferId, plan_stage
    from tandem.request_state import request_from_state, request_state

    policy = StagePolicy(final_blocks=1, max_stages=6, min_copy_stages=1)
    sent, index, skipped = 0, 0, 0
    kv = dst.scheduler.device_kv
    while True:
        req = src.scheduler.requests[rid]
        stage = plan_stage(policy, index, sent, req.num_computed_tokens, BS)
        tid = TransferId(rid, 1, index, stage.final)
        held = []
        if index == 0:
            names = src.block_names(rid, min(stage.end * BS, req.num_computed_tokens))
            held = kv.match_prefix(names, stage.num_blocks)
            skipped = len(held)
        if not stage.final:
            payload = src.gather_request_blocks(rid, stage.start + len(held), stage.end)
            ids = inbox.reserve(tid, stage.num_blocks * BS, now=0.0, held=held)
            dst.runner.scatter_blocks(ids, payload)
            inbox.stage_done(tid, now=0.0)
            sent, index = stage.end, index + 1
            src.step()
            continue
        d = src.detach_request(rid, stage.start)
        state = request_state(d.request, d.num_computed_tokens, d.policy_state)
        ids = inbox.reserve(tid, d.num_computed_tokens - stage.start * BS, now=0.0)
        request = request_from_state(state, 0.0)
        dst.commit_import(request, ids, d.payload, d.num_computed_tokens, d.policy_state)
        inbox.finish(tid)
        src.release_detached(d)
        return request, skipped


def test_migration_to_a_worker_that_caches_the_prefix_moves_only_the_rest(tiny_llama_dir, tmp_path):
    cost = tmp_path / "cost.json"
    CostModel().save(cost)
    base = _engine(tiny_llama_dir, cost, caching=False)
    want = [base.add_request(p, GREEDY) for p in PROMPTS]
    _drain(base)
    src, dst = _engine(tiny_llama_dir, cost), _engine(tiny_llama_dir, cost)
    reqs = _warm(src)
    warm = dst.add_request(SYSTEM + [4, 4], SamplingParams(max_tokens=1))  # dst caches it
    _drain(dst)
    assert warm.is_finished and dst.scheduler.device_kv.num_cached_blocks == 4
    inbox = MigrationInbox(dst.scheduler.device_kv, lease_s=30.0)
    moved, skipped = _migrate_sharing(src, dst, reqs[0].request_id, inbox)
    assert skipped == 4  # the 64-token system prefix was not copied
    table = dst.scheduler.device_kv.block_table(moved.request_id)
    assert table[:4] == dst.scheduler.device_kv.match_prefix(
        src.block_names(reqs[1].request_id, 64)
    )
    _drain(src, dst)
    assert [moved.output_token_ids, reqs[1].output_token_ids, reqs[2].output_token_ids] == [
        r.output_token_ids for r in want
    ]
    _clean(src, dst)


def test_an_import_sharing_blocks_under_wrong_names_is_refused(tiny_llama_dir, tmp_path):
    import pytest

    from tandem.request_state import request_from_state, request_state

    cost = tmp_path / "cost.json"
    CostModel().save(cost)
    src, dst = _engine(tiny_llama_dir, cost), _engine(tiny_llama_dir, cost)
    other = dst.add_request([5] * 40, SamplingParams(max_tokens=1))  # caches 2 other blocks
    _drain(dst)
    r = src.add_request(PROMPTS[0], GREEDY)
    src.step()
    lying = dst.scheduler.device_kv.match_prefix(other.block_hashes)  # names of [5] * 32
    d = src.detach_request(r.request_id)
    skip, ids = (
        len(lying),
        dst.scheduler.device_kv.reserve_import(r.request_id, d.num_computed_tokens, lying),
    )
    request = request_from_state(request_state(d.request, d.num_computed_tokens, {}), 0.0)
    with pytest.raises(ValueError, match="do not hold its tokens"):
        dst.commit_import(request, ids, d.payload[:, :, skip:], d.num_computed_tokens)
    dst.abort_import(r.request_id)
    src.restore_detached(d)
    _drain(src)
    _clean(src, dst)
