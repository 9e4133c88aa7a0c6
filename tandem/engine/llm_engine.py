"""LLMEngine: one scheduler, one model runner, one output processor.

A request's life inside one engine:

1. ``add_request`` validates the token ids and limits and queues a ``Request`` (WAITING).
2. ``step`` asks the scheduler for a batch (decodes first, then prefill chunks under the
   token budget; preempting by swap or recompute when blocks run out), the runner
   executes it, ``update_from_output`` advances progress and applies token-level stops,
   and the output processor detokenizes and applies stop strings.
3. A finished or aborted request's blocks are freed in every tier before the next step.

Async scheduling (``EngineConfig.async_scheduling``, on by default on CUDA): ``step``
schedules and launches iteration N+1 while iteration N still runs on the device, then
waits for N's sampled ids and applies them (``update_from_output``): the host's
scheduling and output work overlaps the device's. N+1 reads N's tokens on the device
(placeholders, ``Request.num_pending_tokens``), so every request's token sequence is
exactly the synchronous one; a request that stops at N (EOS, stop token or string,
abort) has computed one token more, which is dropped. Two cases resolve N first: a
request in N with penalties (the sampler needs its output ids), and moving a request out
(``export_request``/``detach_request``), whose state must be complete; the outputs
resolved then come with the next ``step``.

``export_request``/``import_request`` move a running request, with its KV blocks and its
full state, to another engine; this is the primitive that KV handoff (prefill → decode),
offload and migration are built on.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tandem.config import EngineConfig, ModelConfig, kv_cache_salt, kv_compat_hash
from tandem.engine.output_processor import OutputProcessor
from tandem.engine.outputs import RequestOutput
from tandem.kvcache.manager import KVExport
from tandem.request import Request, RequestStatus, SamplingParams, new_request
from tandem.runner.model_runner import LaunchedStep, ModelRunner
from tandem.sched.cost_model import CostModel
from tandem.sched.output import SchedulerOutput
from tandem.sched.scheduler import Scheduler


@dataclass
class ExportedRequest:
    """A running request, detached from its engine, with its K/V bytes.

    ``payload`` is [layers, 2, n_blocks, block_size, Hkv, D] holding K/V for the first
    ``num_computed_tokens`` tokens of ``request.all_token_ids``.
    """

    request: Request
    num_computed_tokens: int
    compat_hash: str
    payload: torch.Tensor
    policy_state: dict[str, Any] = field(default_factory=dict)
    # (IncrementalDetokenizer, text so far): in-process moves carry the object itself.
    output_state: tuple[Any, str] | None = None


@dataclass
class DetachedRequest:
    """A request taken out of its scheduler for the final stage of a migration. Its blocks
    stay owned by ``export`` until released (moved) or restored (back to running here);
    ``payload`` holds blocks ``from_block`` onwards."""

    request: Request
    num_computed_tokens: int
    payload: torch.Tensor
    policy_state: dict[str, Any]
    output_state: tuple[Any, str] | None
    export: KVExport


class KVCompatibilityError(ValueError):
    pass


@dataclass
class _InFlight:
    """An iteration launched on the device whose sampled ids are not applied yet."""

    sched: SchedulerOutput
    step: LaunchedStep
    resolve_first: bool  # the next schedule() needs its output ids (penalties)


class LLMEngine:
    """The model engine; implements ``tandem.engine.interface.KVEngine``."""

    def __init__(self, config: EngineConfig, tokenizer: Any | None = None) -> None:
        self.model_config = ModelConfig.from_pretrained(config.model)
        max_len = config.scheduler.max_model_len or self.model_config.max_position_embeddings
        if max_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                f"{self.model_config.max_position_embeddings}"
            )
        self.config = replace(config, scheduler=replace(config.scheduler, max_model_len=max_len))
        self.runner = ModelRunner(self.config, self.model_config)
        self.cost_model = self._cost_model()
        self.cache_salt = kv_cache_salt(
            self.model_config, self.config.dtype, self.config.cache.block_size, config.model
        )
        self.scheduler = Scheduler(
            self.config.scheduler, self.config.cache, cost_model=self.cost_model,
            cache_salt=self.cache_salt,
        )  # fmt: skip
        self.tokenizer = tokenizer
        self.outputs = OutputProcessor(tokenizer, self.scheduler.finish)
        self.compat_hash = kv_compat_hash(
            self.model_config, self.config.dtype, self.config.cache.block_size
        )
        self._ids = itertools.count()
        self.num_iterations = 0
        self.async_scheduling = self.config.async_scheduling
        self._in_flight: _InFlight | None = None
        self._ready: list[RequestOutput] = []  # resolved early, returned by the next step
        self._last_resolved = time.monotonic()

    def _cost_model(self) -> CostModel:
        if self.config.cost_model_path is not None:
            return CostModel.load(self.config.cost_model_path)
        if self.config.scheduler.policy == "fcfs":
            return CostModel()  # fcfs never consults it
        from tandem.runner.profile import profile_cost_model

        sched = self.config.scheduler
        return profile_cost_model(self.runner, sched.max_num_batched_tokens, sched.max_num_seqs)

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
        self.outputs.add(req)
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        return self.outputs.abort(req) if req is not None else None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None or bool(self._ready)

    def step(self) -> list[RequestOutput]:
        if self.async_scheduling:
            return self._step_async()
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            self._check_progress()
            return []
        runner_out = self.runner.execute(sched_out)
        self.num_iterations += 1
        events = self.scheduler.update_from_output(sched_out, runner_out)
        return self.outputs.process(events)

    def _check_progress(self) -> None:
        if self.scheduler.num_unfinished and not self.scheduler.running:
            raise RuntimeError("scheduler made no progress with requests pending (a bug)")

    def _step_async(self) -> list[RequestOutput]:
        outputs, self._ready = self._ready, []
        if self._in_flight is not None and self._in_flight.resolve_first:
            outputs += self._resolve()
        sched_out = self.scheduler.schedule()  # overlaps the iteration in flight
        if sched_out.is_empty:
            if self._in_flight is not None:
                outputs += self._resolve()
            elif not outputs:
                self._check_progress()
            return outputs
        step = self.runner.launch(sched_out)
        self.scheduler.on_launched(sched_out)
        self.num_iterations += 1
        resolve_first = any(
            c.sample and c.request.sampling_params.has_penalties for c in sched_out.chunks
        )
        previous, self._in_flight = self._in_flight, _InFlight(sched_out, step, resolve_first)
        if previous is not None:
            outputs += self._apply(previous)
        return outputs

    def _resolve(self) -> list[RequestOutput]:
        """Wait for the iteration in flight and apply its sampled ids."""
        flight, self._in_flight = self._in_flight, None
        return self._apply(flight) if flight is not None else []

    def _apply(self, flight: _InFlight) -> list[RequestOutput]:
        runner_out = self.runner.collect(flight.step)
        now = time.monotonic()
        seconds, self._last_resolved = now - self._last_resolved, now
        events = self.scheduler.update_from_output(flight.sched, runner_out, seconds)
        return self.outputs.process(events)

    def drain(self) -> None:
        """Apply the iteration in flight now (its outputs come with the next ``step``):
        afterwards every request's state is complete (no pending token)."""
        self._ready += self._resolve()

    # ------------------------------------------------------------------ export / import
    def export_request(self, request_id: str) -> ExportedRequest:
        """Detach a running request with its K/V; its blocks here are freed.

        Only between steps: the request must be RUNNING (holding device blocks).
        """
        self.drain()
        d = self.detach_request(request_id)
        self.release_detached(d)
        return ExportedRequest(
            d.request, d.num_computed_tokens, self.compat_hash, d.payload, d.policy_state,
            d.output_state,
        )  # fmt: skip

    # Live migration (stages): copy full blocks while the request keeps running, then
    # detach it with its blocks held by an export until the destination has committed.
    def gather_request_blocks(self, request_id: str, start: int, end: int) -> torch.Tensor:
        """A copy of blocks ``[start, end)`` of a running request's table:
        [layers, 2, end - start, block_size, Hkv, D]. Only between steps. The iteration in
        flight (async scheduling) may still be writing its K/V: the copy is queued after
        it on the same stream and complete when this returns (``gather_blocks``)."""
        self._running(request_id)
        table = self.scheduler.device_kv.block_table(request_id)
        if not 0 <= start <= end <= len(table):
            raise ValueError(f"blocks [{start}, {end}) of {request_id!r}: it has {len(table)}")
        return self.runner.gather_blocks(table[start:end])

    def detach_request(self, request_id: str, from_block: int = 0) -> DetachedRequest:
        """Take a running request out of the scheduler, its blocks held by an export, and
        copy blocks ``from_block`` onwards (those holding its first ``num_computed_tokens``
        tokens). Then ``release_detached`` (it moved) or ``restore_detached`` (it did
        not: it runs here again as before). Only between steps."""
        self.drain()  # its pending token, if any, is part of what moves
        req = self._running(request_id)
        n = req.num_computed_tokens
        policy_state = self.scheduler.policy.describe(req)
        kv = self.scheduler.device_kv
        export = kv.export(request_id, n)
        try:
            payload = self.runner.gather_blocks(list(export.block_ids[from_block:]))
        except BaseException:
            kv.restore_export(export)
            raise
        self.scheduler.detach(request_id)
        output_state = self.outputs.export_state(request_id)
        return DetachedRequest(req, n, payload, policy_state, output_state, export)

    def release_detached(self, detached: DetachedRequest) -> None:
        """The request lives elsewhere now: free its blocks here."""
        self.scheduler.device_kv.release_export(detached.export)

    def restore_detached(self, detached: DetachedRequest) -> None:
        """Undo ``detach_request``: the request runs here again with its blocks, MLFQ queue
        and service (the stream goes on where it stopped)."""
        req = detached.request
        self.scheduler.device_kv.restore_export(detached.export)
        self.scheduler.add_running(req, detached.policy_state)
        self.outputs.import_state(req, detached.output_state)

    def _running(self, request_id: str) -> Request:
        req = self.scheduler.requests.get(request_id)
        if req is None or req.status is not RequestStatus.RUNNING:
            state = "unknown" if req is None else req.status.value
            raise ValueError(f"can only export a running request; {request_id!r} is {state}")
        return req

    # Two-phase import, for a KV receiver that gets the bytes asynchronously: reserve
    # blocks, then commit (write bytes + adopt the request) or abort (free the blocks).
    def reserve_import(self, request_id: str, num_tokens: int) -> list[int]:
        if request_id in self.scheduler.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        return self.scheduler.device_kv.reserve_import(request_id, num_tokens)

    def reserve_import_cached(
        self, request_id: str, num_tokens: int, block_names: list[bytes]
    ) -> tuple[int, list[int]]:
        """``reserve_import`` that shares the leading blocks this engine has cached under
        the sender's ``block_names``: returns (how many it holds, ids for the rest, whose
        bytes must come). ``commit_import`` checks the names against the tokens."""
        if request_id in self.scheduler.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        kv = self.scheduler.device_kv
        held = (
            kv.match_prefix(block_names, num_tokens // kv.block_size)
            if self.scheduler.caching
            else []
        )
        return len(held), kv.reserve_import(request_id, num_tokens, held)

    def block_names(self, request_id: str, num_tokens: int) -> list[bytes]:
        """The prefix-cache names of a request's full blocks within ``num_tokens`` (what a
        KV sender offers, so the receiver can skip the blocks it holds)."""
        req = self.scheduler.requests[request_id]
        return list(
            self.scheduler.block_names(req, num_tokens)[: num_tokens // self.scheduler.block_size]
        )

    def commit_import(self, request: Request, block_ids: list[int], payload: torch.Tensor,
                      num_computed_tokens: int, policy_state: dict[str, Any] | None = None,
                      output_state: tuple[Any, str] | None = None) -> None:  # fmt: skip
        """Write the bytes into the reserved blocks and adopt ``request``. All or nothing:
        on error the reservation is still pending (the caller aborts it)."""
        self.scheduler.check_admissible(request)
        self._check_held_prefix(request)
        self.runner.scatter_blocks(block_ids, payload)
        self.scheduler.device_kv.commit_import(request.request_id)
        request.num_computed_tokens = num_computed_tokens
        self.scheduler.add_running(request, policy_state)
        self.outputs.import_state(request, output_state)

    def _check_held_prefix(self, request: Request) -> None:
        """The cached blocks an import shares must be named after this request's tokens
        (the sender's names chose them): ``ValueError`` otherwise."""
        kv = self.scheduler.device_kv
        held = kv.pending_import_held(request.request_id)
        if not held:
            return
        names = self.scheduler.block_names(request, len(held) * kv.block_size)
        if len(names) < len(held) or any(
            kv.pool.name_of(b) != names[i] for i, b in enumerate(held)
        ):
            raise ValueError(
                f"the cached blocks shared by the import of {request.request_id!r} do not "
                "hold its tokens (the sender's block names do not match its state)"
            )

    def abort_import(self, request_id: str) -> None:
        self.scheduler.device_kv.abort_import(request_id)

    def import_request(self, exported: ExportedRequest) -> Request:
        """Adopt an exported request; it continues exactly where it stopped."""
        if exported.compat_hash != self.compat_hash:
            raise KVCompatibilityError(
                f"KV layout mismatch: sender {exported.compat_hash}, receiver {self.compat_hash} "
                "(model, dtype, block size, KV heads, head dim or layers differ)"
            )
        req = exported.request
        self.scheduler.check_admissible(req)  # duplicate id, limits: before any block moves
        block_ids = self.reserve_import(req.request_id, exported.num_computed_tokens)
        try:
            self.commit_import(
                req, block_ids, exported.payload, exported.num_computed_tokens,
                exported.policy_state, exported.output_state,
            )  # fmt: skip
        except BaseException:
            self.abort_import(req.request_id)
            raise
        return req
