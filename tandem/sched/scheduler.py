"""The iteration scheduler: continuous batching under a token budget (pure).

Each call to ``schedule()`` builds one stall-free batch (Sarathi-Serve):

1. Running requests, in policy order. A decode costs one token; a request still in
   prefill gets the next chunk. If its blocks cannot grow, the lowest-priority running
   request is preempted (swapped to the host tier when there is one with room,
   otherwise its blocks are freed and it will recompute), possibly itself.
2. Swapped requests, in policy order, are swapped back in when blocks allow.
3. Waiting requests (new or preempted), in policy order, while budget, batch size and
   free blocks allow. A chunk that does not finish the prompt ends on a block boundary.

``update_from_output()`` closes the loop: it advances ``num_computed_tokens`` by each
chunk, appends sampled tokens and applies token-level stop rules.

Invariants (checked by the property tests): no request is lost (every request is in
exactly one of waiting / running / swapped until it finishes), no block leaks (a finished
or aborted request owns no block in either tier), the budget and batch size are never
exceeded, and a request that fits the device tier alone always eventually runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.config import CacheConfig, SchedulerConfig
from tandem.kvcache import KVCacheManager
from tandem.request import Request, RequestStatus
from tandem.sched.output import BlockCopy, RunnerOutput, ScheduledChunk, SchedulerOutput
from tandem.sched.policy import SchedulingPolicy, make_policy


@dataclass(frozen=True)
class TokenEvent:
    """A request produced a token (and maybe finished) in the last iteration."""

    request: Request
    token_id: int
    finished: bool


class Scheduler:
    def __init__(
        self,
        sched_config: SchedulerConfig,
        cache_config: CacheConfig,
        policy: SchedulingPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = sched_config
        self.block_size = cache_config.block_size
        self.device_kv = KVCacheManager(cache_config.num_blocks, cache_config.block_size, tier="device")
        self.host_kv = (
            KVCacheManager(cache_config.num_host_blocks, cache_config.block_size, tier="host")
            if cache_config.num_host_blocks > 0
            else None
        )
        self.policy = policy or make_policy(sched_config.policy)
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        # Counters for metrics.
        self.num_preemptions = 0
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0

    # ------------------------------------------------------------------ admission
    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValueError if it can never fit this engine."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        need = request.num_prompt_tokens + request.sampling_params.max_tokens
        max_len = self.config.max_model_len
        if max_len is not None and need > max_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.sampling_params.max_tokens}) = {need} exceeds the maximum context length {max_len}"
            )
        blocks = -(-need // self.block_size)
        if blocks > self.device_kv.pool.num_blocks:
            raise ValueError(
                f"request needs {blocks} KV blocks ({need} tokens) but the cache has only "
                f"{self.device_kv.pool.num_blocks}; lower max_tokens or raise --kv-blocks"
            )
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self.policy.on_arrival(request, self.clock())
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adopt a request whose K/V already sit in this engine's device blocks (import)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not self.device_kv.has(request.request_id):
            raise ValueError(f"request {request.request_id!r} has no imported blocks")
        self.requests[request.request_id] = request
        request.status = RequestStatus.RUNNING
        self.policy.on_arrival(request, self.clock())
        self.running.append(request)

    def detach(self, request_id: str) -> Request:
        """Remove a running request without freeing its blocks (for export)."""
        request = self.requests.pop(request_id)
        if request not in self.running:
            self.requests[request_id] = request
            raise ValueError(f"request {request_id!r} is not running (status {request.status.value})")
        self.running.remove(request)
        self.policy.on_finish(request)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ batch building
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        key = lambda r: self.policy.sort_key(r, now)  # noqa: E731
        self.running.sort(key=key)
        scheduled: list[Request] = []

        # 1. Running requests, highest priority first; preempt from the tail when short.
        queue = list(self.running)
        while queue and budget > 0:
            req = queue.pop(0)
            n = self._chunk_len(req, budget)
            if n <= 0:
                continue
            while not self.device_kv.can_allocate(req.request_id, req.num_computed_tokens + n):
                victim = queue.pop() if queue else req
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            self._add_chunk(req, n, out)
            scheduled.append(req)
            budget -= n

        # 2. Swapped requests come back before new work (they already hold progress).
        if self.swapped and not out.swap_out:
            self.swapped.sort(key=key)
            for req in list(self.swapped):
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                if not self._swap_in(req, out):
                    break
                n = self._chunk_len(req, budget)
                if n > 0 and self.device_kv.can_allocate(req.request_id, req.num_computed_tokens + n):
                    self._add_chunk(req, n, out)
                    scheduled.append(req)
                    budget -= n

        # 3. Waiting requests: FIFO inside the policy order; stop at the first that
        #    does not fit so a large request at the head is not starved by small ones.
        if self.waiting and not out.preempted:
            self.waiting.sort(key=key)
            for req in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                n = self._chunk_len(req, budget)
                if n <= 0:
                    break
                if not self.config.enable_chunked_prefill and n < req.num_uncomputed_tokens:
                    break
                if not self.device_kv.can_allocate(req.request_id, req.num_computed_tokens + n):
                    break
                self.waiting.remove(req)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                self._add_chunk(req, n, out)
                scheduled.append(req)
                budget -= n
        return out

    def _chunk_len(self, req: Request, budget: int) -> int:
        """Tokens to compute for ``req`` now: all that remain, or a block-aligned chunk."""
        remaining = req.num_uncomputed_tokens
        if remaining <= budget:
            return remaining
        if not self.config.enable_chunked_prefill and req.num_computed_tokens == 0:
            return budget  # caller refuses a partial prompt in this mode
        end = (req.num_computed_tokens + budget) // self.block_size * self.block_size
        n = end - req.num_computed_tokens
        if n > 0:
            return n
        # Less than a block of budget left: wait for the next iteration rather than
        # cut an unaligned sliver, unless the whole budget is below one block.
        return budget if self.config.max_num_batched_tokens < self.block_size else 0

    def _add_chunk(self, req: Request, n: int, out: SchedulerOutput) -> None:
        self.device_kv.allocate(req.request_id, req.num_computed_tokens + n)
        start = req.num_computed_tokens
        tokens = req.all_token_ids[start : start + n]
        out.chunks.append(
            ScheduledChunk(
                request=req,
                token_ids=tokens,
                start_pos=start,
                block_table=self.device_kv.block_table(req.request_id),
                sample=start + n == req.num_tokens,
            )
        )

    # ------------------------------------------------------------------ preemption
    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.num_preemptions += 1
        req.num_preemptions += 1
        out.preempted.append(req.request_id)
        if self._swap_out(req, out):
            return
        self.device_kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.append(req)

    def _swap_out(self, req: Request, out: SchedulerOutput) -> bool:
        host = self.host_kv
        if (
            host is None
            or self.config.preemption_mode != "swap"
            or req.num_computed_tokens == 0
            or not host.can_allocate(req.request_id, req.num_computed_tokens)
        ):
            return False
        export = self.device_kv.export(req.request_id, req.num_computed_tokens)
        dst = host.reserve_import(req.request_id, req.num_computed_tokens)
        out.swap_out.append(BlockCopy("device", export.block_ids, tuple(dst)))
        host.commit_import(req.request_id)
        # Safe to free now: the runner copies swap-outs before the forward pass.
        self.device_kv.release_export(export)
        self.num_swapped_out_blocks += len(dst)
        req.status = RequestStatus.SWAPPED
        self.swapped.append(req)
        return True

    def _swap_in(self, req: Request, out: SchedulerOutput) -> bool:
        assert self.host_kv is not None
        need = -(-req.num_computed_tokens // self.block_size)
        # Keep room for the request's next token, or it would be preempted at once.
        if not self.device_kv.can_allocate(req.request_id, req.num_computed_tokens, reserve=1):
            return False
        export = self.host_kv.export(req.request_id, req.num_computed_tokens)
        dst = self.device_kv.reserve_import(req.request_id, req.num_computed_tokens)
        assert len(dst) == need
        out.swap_in.append(BlockCopy("host", export.block_ids, tuple(dst)))
        self.device_kv.commit_import(req.request_id)
        # Host blocks are only overwritten by a later swap-out, which the runner orders
        # before swap-ins of the same iteration; they may be reused after this copy.
        self.host_kv.release_export(export)
        self.num_swapped_in_blocks += need
        self.swapped.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return True

    # ------------------------------------------------------------------ feedback
    def update_from_output(self, sched_out: SchedulerOutput, runner_out: RunnerOutput) -> list[TokenEvent]:
        now = self.clock()
        events: list[TokenEvent] = []
        for chunk in sched_out.chunks:
            req = chunk.request
            if req.is_finished or req.status is not RequestStatus.RUNNING:
                continue  # aborted while the iteration ran
            req.num_computed_tokens += chunk.num_tokens
            self.policy.on_service(req, chunk.num_tokens, now)
            if not chunk.sample:
                continue
            token = runner_out.sampled[req.request_id]
            if req.request_id in runner_out.logprobs:
                req.output_logprobs.append(runner_out.logprobs[req.request_id])
            finished = req.append_output(token)
            if finished is not None:
                self.finish(req.request_id, finished)
            events.append(TokenEvent(req, token, finished is not None))
        return events

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (stop, length or abort) and free its blocks in every tier."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for queue in (self.running, self.waiting, self.swapped):
            if req in queue:
                queue.remove(req)
                break
        self.device_kv.free(request_id)
        if self.host_kv is not None:
            self.host_kv.free(request_id)
        req.status = status
        self.policy.on_finish(req)
        return req

    def abort(self, request_id: str) -> Request | None:
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)
