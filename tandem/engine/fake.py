"""A model-free engine: emits tokens without a model, to measure the control plane alone.

``FakeEngine`` implements ``tandem.engine.interface.Engine``, the surface ``WorkerService``
uses of ``LLMEngine`` (``add_request``, ``abort_request``, ``has_unfinished_requests``,
``step``, ``scheduler`` with its counters, ``config``, ``model_config``, ``compat_hash``,
``num_iterations``), and never imports torch. ``tandem decode-worker --fake-engine [--fake-step-ms X]`` serves it,
and ``bench/router_overhead.py`` drives it through the router.

A request's life here:

1. ``add_request`` validates like the real engine (token ids in the vocabulary, a
   non-empty prompt, prompt + max_tokens within max_model_len and within the KV pool) and
   queues the request (WAITING), ordered by (priority, arrival).
2. ``step`` admits waiting requests while fewer than ``max_num_seqs`` run and their KV
   blocks fit, then gives every running request one token: output k of a request with a
   prompt of n tokens is ``token_table[(n + k) % len(token_table)]``. The stop rules are
   the real ones (``Request.append_output``: EOS unless ignore_eos, stop_token_ids,
   min_tokens, max_tokens). Prefill costs nothing: a request's first token comes in the
   step that admits it.
3. With ``step_time_s > 0`` an iteration lasts at least that long (it sleeps the rest), as a
   GPU decode step would; with 0 it runs as fast as Python allows.
4. A finished or aborted request frees its blocks at once.

KV bookkeeping is simplified: a request reserves the blocks for prompt + max_tokens when
it is admitted, so there is never a preemption and ``kv_used`` is the sum of reservations.

The token table defaults to the ids that a detokenizer turns into text on their own (no
special token, no partial UTF-8 character; ``streamable_token_ids``), so that every token
becomes exactly one SSE event at the router; without a tokenizer it is the whole vocabulary.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tandem.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, kv_compat_hash
from tandem.engine.outputs import RequestOutput
from tandem.request import Request, RequestStatus, SamplingParams, new_request
from tandem.sched.offload import SwapStats
from tandem.sched.scheduler import check_fits


class _FakeBlockPool:
    """Counts KV blocks; ``WorkerService.stats`` reads ``num_free_blocks`` and ``pool.num_used``."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.num_used = 0
        self.pool = self  # the real KV manager exposes its block pool as ``.pool``

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self.num_used


class _FakeScheduler:
    """The scheduler state ``WorkerService.stats`` reads, and FCFS-by-priority admission."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config.scheduler
        self.block_size = config.cache.block_size
        self.device_kv = _FakeBlockPool(config.cache.num_blocks)
        self.requests: dict[str, Request] = {}
        self.waiting: list[tuple[int, int, Request]] = []  # heap of (priority, seq, request)
        self.running: list[Request] = []
        self.swapped: list[Request] = []  # always empty: the fake never swaps
        self.num_preemptions = 0
        self.swap = SwapStats()  # stays zero
        self._blocks: dict[str, int] = {}  # request id -> reserved blocks
        self._seq = itertools.count()

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def blocks_needed(self, req: Request) -> int:
        return -(-(req.num_prompt_tokens + req.sampling_params.max_tokens) // self.block_size)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        check_fits(req, self.config.max_model_len, self.block_size, self.device_kv.num_blocks, None)
        self.requests[req.request_id] = req
        heapq.heappush(self.waiting, (req.priority, next(self._seq), req))

    def admit(self) -> None:
        """Move waiting requests to running, in (priority, arrival) order, while they fit."""
        pool = self.device_kv
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0][2]
            if req.is_finished:  # aborted while waiting
                heapq.heappop(self.waiting)
                continue
            need = self.blocks_needed(req)
            if need > pool.num_free_blocks:
                break
            heapq.heappop(self.waiting)
            pool.num_used += need
            self._blocks[req.request_id] = need
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.device_kv.num_used -= self._blocks.pop(req.request_id, 0)
        del self.requests[req.request_id]

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        was_running = req.status is RequestStatus.RUNNING
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        if was_running:
            self.running.remove(req)
        # A waiting request stays in the heap; admit() drops it (it is finished).
        return req


class FakeEngine:
    """An ``Engine`` without a model: a drop-in for ``LLMEngine`` inside ``WorkerService``."""

    def __init__(
        self,
        config: EngineConfig,
        step_time_s: float = 0.0,
        model_config: ModelConfig | None = None,
        token_table: Sequence[int] | None = None,
    ) -> None:
        if step_time_s < 0:
            raise ValueError("step_time_s (--fake-step-ms) must be >= 0")
        self.model_config = model_config or ModelConfig.from_pretrained(config.model)
        max_len = config.scheduler.max_model_len or self.model_config.max_position_embeddings
        self.config = replace(config, scheduler=replace(config.scheduler, max_model_len=max_len))
        self.scheduler = _FakeScheduler(self.config)
        self.compat_hash = kv_compat_hash(
            self.model_config, self.config.dtype, self.config.cache.block_size
        )
        self.tokenizer = None
        self.step_time_s = step_time_s
        self.num_iterations = 0
        vocab = self.model_config.vocab_size
        if token_table is None:
            token_table = streamable_token_ids(config.model, vocab)
        self.token_table = tuple(token_table)
        if not self.token_table or not all(0 <= t < vocab for t in self.token_table):
            raise ValueError(f"token_table must be a non-empty list of ids in [0, {vocab})")
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> Request:
        req = new_request(
            request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids,
            params,
            self.model_config.vocab_size,
            self.model_config.eos_token_ids,
            priority,
            arrival_time,
        )
        self.scheduler.add_request(req)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        return _output(req, [], True) if req is not None else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        s = self.scheduler
        s.admit()
        if not s.running:
            return []
        table, n_table = self.token_table, len(self.token_table)
        outputs: list[RequestOutput] = []
        still: list[Request] = []
        for req in s.running:
            token = table[(req.num_prompt_tokens + req.num_output_tokens) % n_table]
            status = req.append_output(token)
            if req.sampling_params.logprobs is not None:
                top = [(token, 0.0)] if req.sampling_params.logprobs else []
                req.output_logprobs.append((0.0, top))
            req.num_computed_tokens = req.num_tokens - 1  # the new token's K/V come next step
            if status is not None:
                s.finish(req, status)
            else:
                still.append(req)
            outputs.append(_output(req, [token], status is not None))
        s.running = still
        self.num_iterations += 1
        if self.step_time_s > 0:
            rest = start + self.step_time_s - time.monotonic()
            if rest > 0:
                time.sleep(rest)
        return outputs


def _output(req: Request, new_ids: list[int], finished: bool) -> RequestOutput:
    return RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        token_ids=list(req.output_token_ids),
        new_token_ids=new_ids,
        finished=finished,
        finish_reason=req.status.finish_reason if finished else None,
        stop_reason=req.stop_reason,
        logprobs=list(req.output_logprobs) if req.sampling_params.logprobs is not None else None,
        num_preemptions=req.num_preemptions,
    )


def streamable_token_ids(model_dir: str | Path, vocab_size: int) -> tuple[int, ...]:
    """Ids below ``vocab_size`` that decode on their own to text: not special, not part of
    a UTF-8 character. All ids when the folder has no fast tokenizer."""
    try:
        from tandem.tokenizer import FastTokenizer

        tok = FastTokenizer(model_dir)
    except (ValueError, OSError):
        return tuple(range(vocab_size))
    special = set(tok.all_special_ids)
    ids = tuple(
        i
        for i in range(vocab_size)
        if i not in special and (text := tok.decode([i])) and "\ufffd" not in text
    )
    return ids or tuple(range(vocab_size))


def fake_engine_config(args: Any) -> EngineConfig:
    """An ``EngineConfig`` from the decode-worker flags, without importing torch.

    ``--kv-blocks`` defaults to enough for ``max_num_seqs`` requests of max_model_len.
    """
    model = args.model
    if model is None:
        from tandem.tinymodel import default_model_dir  # builds it on first use (torch)

        model = default_model_dir()
    model = str(model)
    kv_blocks = args.kv_blocks
    if kv_blocks is None:
        max_len = args.max_model_len or ModelConfig.from_pretrained(model).max_position_embeddings
        kv_blocks = args.max_num_seqs * -(-max_len // args.block_size)
    return EngineConfig(
        model=model,
        dtype=args.dtype,
        seed=args.seed,
        cache=CacheConfig(block_size=args.block_size, num_blocks=kv_blocks),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.policy,
            max_model_len=args.max_model_len,
        ),
    )
