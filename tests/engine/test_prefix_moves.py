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
