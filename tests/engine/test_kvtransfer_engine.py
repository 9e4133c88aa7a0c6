"""Move running requests between two real engines through the tcp KV transfer backend
(and the nccl backend's control flow, with fake communicators).

The two halves of ``LLMEngine.export_request`` / ``import_request`` are driven through the
transfer's callbacks: the source exports and gathers, sends, and only on success detaches
the request and releases its export (restoring it on failure); the destination reserves,
scatters and commits inside ``commit``. The continuation must equal an uninterrupted run,
and neither engine may keep a block afterwards.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from kvtransfer import KVBundle, KVSender, RefuseReason, TransferRefused, make_receiver, make_sender
from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.request import Request, RequestStatus, SamplingParams
from tandem.request_state import params_from_wire, params_to_wire
from tandem.sched.cost_model import CostModel
from tests.engine.parity import mixed_prompts
from tests.unit.kvtransfer.fakes import peer_options

pytestmark = pytest.mark.asyncio


PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
]


@pytest.fixture(scope="module")
def make_engine(tiny_model_dirs, tmp_path_factory):
    """Engines on the tiny Llama (MLFQ, so policy state travels). A fixed cost model file
    skips start-up profiling: faster, and queue choices do not depend on timing."""
    cost_model = tmp_path_factory.mktemp("kvtransfer") / "cost_model.json"
    CostModel().save(cost_model)

    def make() -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=str(tiny_model_dirs["llama"]),
                cache=CacheConfig(block_size=16, num_blocks=256),
                scheduler=SchedulerConfig(max_num_batched_tokens=64),
                cost_model_path=str(cost_model),
            )
        )

    return make


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return mixed_prompts(2048, n=len(PARAMS), seed=11, max_len=120)


@pytest.fixture(scope="module")
def expected(make_engine, prompts) -> list[list[int]]:
    """Outputs of an uninterrupted run on one engine."""
    engine = make_engine()
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, PARAMS, strict=True)]
    drain(engine)
    return [r.output_token_ids for r in reqs]


class EngineImport:
    """Receiver callbacks for an ``LLMEngine``: ``import_request`` split at the transfer."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.imported: dict[str, Request] = {}

    def reserve(self, request_id: str, num_tokens: int) -> list[int]:
        return self.engine.scheduler.device_kv.reserve_import(request_id, num_tokens)

    def commit(
        self, request_id: str, block_ids: list[int], payload: torch.Tensor, state: dict[str, Any]
    ) -> None:
        engine = self.engine
        req = Request(
            request_id=request_id,
            prompt_token_ids=list(state["prompt_token_ids"]),
            sampling_params=params_from_wire(state["params"]),
            arrival_time=time.monotonic(),
            priority=state["priority"],
            eos_token_ids=engine.model_config.eos_token_ids,
            output_token_ids=list(state["output_token_ids"]),
        )
        engine.scheduler.check_admissible(req)  # before the import becomes a table
        engine.runner.scatter_blocks(block_ids, payload)
        engine.scheduler.device_kv.commit_import(request_id)
        req.num_computed_tokens = state["num_computed_tokens"]
        engine.scheduler.add_running(req, state["policy_state"])
        engine.outputs.import_state(req, None)
        self.imported[request_id] = req

    def abort(self, request_id: str, block_ids: list[int]) -> None:
        self.engine.scheduler.device_kv.abort_import(request_id)


async def move(src: LLMEngine, sender: KVSender, dest: str, request_id: str) -> None:
    """``export_request`` split at the transfer: blocks are freed only after DONE. The
    request leaves the scheduler first, so the engine could keep stepping the others while
    the bytes move; a failed transfer puts it back exactly as it was."""
    sched = src.scheduler
    req = sched.requests[request_id]
    n = req.num_computed_tokens
    state = {
        "request_id": request_id,
        "prompt_token_ids": req.prompt_token_ids,
        "output_token_ids": req.output_token_ids,
        "params": params_to_wire(req.sampling_params),
        "num_computed_tokens": n,
        "priority": req.priority,
        "policy_state": sched.policy.describe(req),
    }
    export = sched.device_kv.export(request_id, n)
    sched.detach(request_id)
    try:
        payload = src.runner.gather_blocks(list(export.block_ids))
        await sender.send(dest, KVBundle(request_id, n, payload, state))
    except BaseException:
        sched.device_kv.restore_export(export)
        sched.add_running(req, state["policy_state"])
        raise
    sched.device_kv.release_export(export)
    src.outputs.export_state(request_id)


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def assert_no_blocks_held(*engines: LLMEngine) -> None:
    for engine in engines:
        kv = engine.scheduler.device_kv
        assert kv.audit().ok and kv.num_free_blocks == kv.pool.num_blocks


@pytest.mark.parametrize("steps_before_move", [1, 4])  # 1: some are mid-prefill
@pytest.mark.parametrize("backend", ["tcp", "nccl"])  # nccl: fake communicators on a CPU
async def test_requests_moved_over_tcp_continue_identically(
    make_engine, prompts, expected, steps_before_move, backend
):
    src, dst = make_engine(), make_engine()
    port = EngineImport(dst)
    receiver = make_receiver(backend, dst.compat_hash, port, **peer_options(backend))
    await receiver.start()
    sender = make_sender(backend, src.compat_hash, **peer_options(backend, receiver))
    reqs = [src.add_request(p, sp) for p, sp in zip(prompts, PARAMS, strict=True)]
    for _ in range(steps_before_move):
        src.step()
    moved = {r.request_id for r in reqs if r.status is RequestStatus.RUNNING}
    levels = {rid: src.scheduler.policy.level_of(rid) for rid in moved}
    await asyncio.gather(*(move(src, sender, receiver.address, rid) for rid in moved))
    assert {rid: dst.scheduler.policy.level_of(rid) for rid in moved} == levels
    assert sender.metrics.ok == receiver.metrics.ok == len(moved)
    assert not moved & set(src.scheduler.requests) and moved == set(dst.scheduler.requests)
    await sender.close()
    await receiver.close()

    drain(src)
    drain(dst)
    for r, want in zip(reqs, expected, strict=True):
        final = port.imported[r.request_id] if r.request_id in moved else r
        assert final.output_token_ids == want, f"{r.request_id} continued differently"
    assert_no_blocks_held(src, dst)


async def test_refused_move_leaves_the_request_running_on_the_source(
    make_engine, prompts, expected
):
    src, dst = make_engine(), make_engine()
    receiver = make_receiver("tcp", dst.compat_hash, EngineImport(dst))
    await receiver.start()
    sender = make_sender("tcp", src.compat_hash)
    dst_kv = dst.scheduler.device_kv
    dst_kv.allocate("filler", dst_kv.num_blocks * dst_kv.block_size)  # destination is full
    reqs = [src.add_request(p, sp) for p, sp in zip(prompts, PARAMS, strict=True)]
    for _ in range(4):
        src.step()
    rid = next(r.request_id for r in reqs if r.status is RequestStatus.RUNNING)
    level = src.scheduler.policy.level_of(rid)
    with pytest.raises(TransferRefused, match="no free blocks") as err:
        await move(src, sender, receiver.address, rid)
    assert err.value.reason is RefuseReason.NO_FREE_BLOCKS
    assert src.scheduler.policy.level_of(rid) == level and src.scheduler.device_kv.has(rid)
    await sender.close()
    await receiver.close()
    dst_kv.free("filler")

    drain(src)
    assert [r.output_token_ids for r in reqs] == expected
    assert_no_blocks_held(src, dst)
