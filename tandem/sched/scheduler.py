"""The iteration scheduler: continuous batching under a token budget (pure).

Each call to ``schedule()`` builds one stall-free batch (Sarathi-Serve):

1. Running requests, in policy order. A decode costs one token; a request still in
   prefill gets the next chunk. If its blocks cannot grow, the lowest-priority running
   request is preempted (swapped to the host tier when there is one with room,
   otherwise its blocks are freed and it will recompute), possibly itself.
2. Swapped requests, in policy order, are swapped back in when blocks allow.
3. Waiting requests (new or preempted), in policy order, while budget, batch size and
   free blocks allow. A chunk that does not finish the prompt ends on a block boundary.
   With prefix caching a waiting request first takes its longest cached prefix (full
   blocks whose names match, shared by reference), so its first chunk starts there; at
   least one token is always left to compute, so the pass that finishes the prompt has
   logits to sample from. Its full blocks are named as they are computed
   (``update_from_output``), and stay cached after it ends until the space is needed.
   With a host tier the cache has two levels (``prefix_cache.py``): evicted cached
   blocks are written to the host, and a prefix found there is loaded back.
4. With a host tier, copies ahead of need (FastServe, rules in ``offload.py``): below the
   free-block watermark, idle low-priority residents are offloaded to the host; above
   it, swapped requests of the next batch are prefetched. The runner overlaps these
   copies with the forward pass; the batch built in steps 1–3 uses none of their blocks.

``update_from_output()`` closes the loop: it advances ``num_computed_tokens`` by each
chunk, appends sampled tokens and applies token-level stop rules.

Async scheduling splits that in two: ``on_launched()`` right after the runner has queued
the iteration (progress advances and each sampling chunk leaves a pending token, so the
next ``schedule()`` can run while the device computes), then ``update_from_output()`` one
step later with the sampled ids. Between the two a request may be preempted, swapped or
finished (stop string, abort); its pending token is still appended unless it finished.
A request whose pending token is its last is not scheduled again.

Invariants (checked by the property tests): no request is lost (every request is in
exactly one of waiting / running / swapped until it finishes), no block leaks (a finished
or aborted request owns no block in either tier), the budget and batch size are never
exceeded, and a request that fits the device tier alone always eventually runs. With
prefix caching: no chunk writes a block that is shared or cached (``_add_chunk`` checks),
and a waiting request holds no device blocks (a prefix taken for a request that is then
not admitted is given back in the same call).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.config import CacheConfig, SchedulerConfig
from tandem.kvcache import KVCacheManager
from tandem.request import Request, RequestStatus
from tandem.sched.cost_model import CostModel
from tandem.sched.offload import Candidate, OffloadPlanner, SwapStats
from tandem.sched.output import BlockCopy, RunnerOutput, ScheduledChunk, SchedulerOutput
from tandem.sched.policy import SchedulingPolicy, make_policy
from tandem.sched.prefix_cache import PrefixCache


def check_fits(
    request: Request,
    max_model_len: int | None,
    block_size: int,
    num_blocks: int,
    token_budget: int | None,
) -> None:
    """Raise ValueError (naming the limit) if ``request`` could never run on an engine with
    these limits: context length, KV blocks, and — when given — a token budget that must
    hold prompt + output in one pass."""
    need = request.num_prompt_tokens + request.sampling_params.max_tokens
    if max_model_len is not None and need > max_model_len:
        raise ValueError(
            f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
            f"({request.sampling_params.max_tokens}) = {need} exceeds the maximum context length {max_model_len}"
        )
    if token_budget is not None and need > token_budget:
        raise ValueError(
            f"prompt + max_tokens = {need} exceeds the token budget "
            f"{token_budget}; enable chunked prefill or raise the budget"
        )
    blocks = -(-need // block_size)
    if blocks > num_blocks:
        raise ValueError(
            f"request needs {blocks} KV blocks ({need} tokens) but the cache has only "
            f"{num_blocks}; lower max_tokens or raise --kv-blocks"
        )


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
        cost_model: CostModel | None = None,
        cache_salt: str = "",
    ) -> None:
        """``cache_salt``: what besides tokens names a block (``config.kv_cache_salt``)."""
        self.config = sched_config
        self.block_size = cache_config.block_size
        self.caching = cache_config.enable_prefix_caching
        self.device_kv = KVCacheManager(
            cache_config.num_blocks, cache_config.block_size, tier="device"
        )
        self.host_kv = (
            KVCacheManager(cache_config.num_host_blocks, cache_config.block_size, tier="host")
            if cache_config.num_host_blocks > 0
            else None
        )
        self.swap = SwapStats()
        self.prefix = PrefixCache(
            self.caching, cache_config.block_size, cache_salt, self.device_kv, self.host_kv,
            cache_config.swap_int8, self.swap,
        )  # fmt: skip
        self.cost_model = cost_model or CostModel()
        self.policy = policy or make_policy(
            sched_config.policy,
            cost_model=self.cost_model,
            q0=sched_config.mlfq_q0,
            num_levels=sched_config.mlfq_levels,
            skip_join=sched_config.skip_join,
            starvation_limit=sched_config.starvation_limit,
        )
        self._scheduled_at = 0.0
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.offload = OffloadPlanner(
            sched_config.swap_watermark if self.host_kv is not None else 0.0,
            cache_config.num_blocks,
            sched_config.swap_hysteresis_iters,
        )
        self.iteration = 0  # schedule() calls so far
        # Counters for metrics.
        self.num_preemptions = 0

    @property
    def num_swapped_out_blocks(self) -> int:
        return self.swap.out_blocks

    @property
    def num_swapped_in_blocks(self) -> int:
        return self.swap.in_blocks

    # ------------------------------------------------------------------ admission
    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValueError if it can never fit this engine."""
        self.check_admissible(request)
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        # What the cache holds of it now: a policy ranks it by the prefill it will need
        # (skip-join MLFQ joins on the uncached length). Admission records the real hit.
        request.num_cached_tokens = self.prefix.peek(request)
        self.policy.on_arrival(request, self.clock())
        self.waiting.append(request)

    def check_admissible(self, request: Request) -> None:
        """Raise ValueError if ``request`` is a duplicate or could never fit this engine."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        check_fits(
            request,
            self.config.max_model_len,
            self.block_size,
            self.device_kv.pool.num_blocks,
            # Without chunking, a preempted request recomputes prompt + output in one pass.
            None if self.config.enable_chunked_prefill else self.config.max_num_batched_tokens,
        )

    def add_running(self, request: Request, policy_state: dict | None = None) -> None:
        """Adopt a request whose K/V already sit in this engine's device blocks (import).

        ``policy_state`` is the source policy's ``describe()`` of it: the priority travels
        with the request (its MLFQ queue and service, its ALISE prediction).
        """
        self.check_admissible(request)
        if not self.device_kv.has(request.request_id):
            raise ValueError(f"request {request.request_id!r} has no imported blocks")
        self.requests[request.request_id] = request
        request.status = RequestStatus.RUNNING
        self.policy.on_arrival(request, self.clock())
        if policy_state:
            self.policy.restore(request, policy_state, self.clock())
        self.running.append(request)
        self.prefix.computed(request)  # its imported full blocks can be shared from now on

    def detach(self, request_id: str) -> Request:
        """Remove a running request without freeing its blocks (for export)."""
        request = self.requests.pop(request_id)
        if request not in self.running:
            self.requests[request_id] = request
            raise ValueError(
                f"request {request_id!r} is not running (status {request.status.value})"
            )
        self.running.remove(request)
        self.policy.on_finish(request)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ batch building
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.prefix.begin(out)
        try:
            self._build(out)
        finally:
            self.prefix.end()
        return out

    def _build(self, out: SchedulerOutput) -> None:
        now = self.clock()
        self._scheduled_at = now
        self.iteration += 1
        budget = self.config.max_num_batched_tokens
        # A request awaiting its last token (async scheduling) has nothing left to run.
        running = [r for r in self.running if not r.awaits_last_token]
        live = [*running, *self.swapped, *self.waiting]
        self.policy.before_schedule(live, now)
        order = sorted(live, key=lambda r: self._order_key(r, now))
        rank = {r.request_id: i for i, r in enumerate(order)}
        # Resident requests (holding device blocks), lowest priority last: eviction victims.
        resident = [r for r in order if r.status is RequestStatus.RUNNING]
        picked = 0
        admitting = True  # cleared when a non-resident request does not fit (FIFO head)
        evicted: set[str] = set()  # preempted in this call: not re-admitted in it
        # Stall-free (Sarathi-Serve): a prefill chunk leaves one token of budget for every
        # decode-ready request behind it that can still get a batch slot, so decodes never
        # wait for a prefill; priority still decides who gets the slots.
        decodes_behind = sum(1 for r in resident if r.num_uncomputed_tokens == 1)
        for req in order:
            if req.request_id in evicted:
                continue
            is_decode = req.status is RequestStatus.RUNNING and req.num_uncomputed_tokens == 1
            if is_decode:
                decodes_behind -= 1
            if budget <= 0 or picked >= self.config.max_num_seqs:
                break
            reserve = 0 if is_decode else min(decodes_behind, self.config.max_num_seqs - picked - 1)
            avail = budget - reserve
            if avail <= 0:
                continue
            waiting = req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            took_prefix = waiting and admitting and self.prefix.take(req)
            n = self._chunk_len(req, avail)
            if n <= 0:
                if took_prefix:
                    self.prefix.drop(req)
                continue  # no budget left for it this iteration; not a memory stall
            if req.status is RequestStatus.SWAPPED:
                # Never swap in during an iteration that swapped out (no ping-pong), and
                # only into free blocks, with room for the chunk it will run right away.
                if (
                    not admitting
                    or out.swaps_out
                    or not self.device_kv.can_allocate(req.request_id, req.num_computed_tokens + n)
                ):
                    admitting = False
                    continue
                self._swap_in(req, out)
                resident.insert(0, req)
            else:
                if req.status is not RequestStatus.RUNNING and not admitting:
                    continue
                n, victims = self._room_for(req, n, resident, rank)
                for v in victims:
                    resident.remove(v)
                    evicted.add(v.request_id)
                    if v.num_uncomputed_tokens == 1:
                        decodes_behind -= 1
                    self._preempt(v, out)
                if req.status is not RequestStatus.RUNNING:  # waiting: admit or stop admitting
                    partial = n < req.num_uncomputed_tokens
                    if n <= 0 or (partial and not self.config.enable_chunked_prefill):
                        admitting = False
                        if took_prefix:
                            self.prefix.drop(req)
                        continue
                    self.prefix.admitted(req, out)
                    self.waiting.remove(req)
                    req.status = RequestStatus.RUNNING
                    self.running.append(req)
                    resident.insert(0, req)
                elif n <= 0:
                    # Nothing below it to evict and no room at all: it gives up its blocks.
                    self._preempt(req, out)
                    resident.remove(req)
                    continue
            self._add_chunk(req, n, out)
            picked += 1
            budget -= n
        if self.offload.enabled:
            self._plan_ahead(order, out)

    def _plan_ahead(self, order: list[Request], out: SchedulerOutput) -> None:
        """Offload below the watermark or prefetch above it (rules in ``offload.py``)."""
        host = self.host_kv
        assert host is not None
        dev = self.device_kv
        in_batch = {c.request.request_id for c in out.chunks}
        if dev.num_free_blocks < self.offload.watermark:
            if out.swaps_in or self.config.preemption_mode != "swap":
                return
            idle = [
                Candidate(
                    r.request_id,
                    dev.num_releasable(r.request_id),
                    host.blocks_needed(r.request_id, r.num_computed_tokens),
                )
                for r in reversed(order)
                if r.status is RequestStatus.RUNNING
                and r.num_computed_tokens > 0
                and r.request_id not in in_batch
            ]
            plan = self.offload.plan_offload(
                idle, dev.num_free_blocks, host.num_free_blocks, self.iteration
            )
            for rid in plan:
                req = self.requests[rid]
                self.running.remove(req)
                swapped = self._swap_out(req, out, ahead=True)
                assert swapped, "the planner checked host room"
                self.swap.proactive_outs += 1
        elif not out.swaps_out:
            # The next batch, should this one's requests all leave: the first max_num_seqs
            # requests of the order outside this batch. Its swapped requests come back in
            # order, but none ahead of a waiting request (that one gets the blocks first).
            nxt = [r for r in order if r.request_id not in in_batch][: self.config.max_num_seqs]
            swapped: list[Candidate] = []
            for r in nxt:
                if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                    break
                if r.status is RequestStatus.SWAPPED:
                    need = dev.blocks_needed(r.request_id, r.num_computed_tokens)
                    swapped.append(Candidate(r.request_id, need, 0))
            for rid in self.offload.plan_prefetch(swapped, dev.num_free_blocks):
                self._swap_in(self.requests[rid], out, ahead=True)
                self.swap.prefetches += 1

    def _room_for(
        self, req: Request, n: int, resident: list[Request], rank: dict[str, int]
    ) -> tuple[int, list[Request]]:
        """How many of ``n`` tokens ``req`` can compute now, and whom to evict for it.

        Evicts only residents ranked below ``req``, and only if evicting them actually
        makes room for the whole chunk (a futile eviction would throw away their KV for
        nothing). Failing that, a prefill chunk shrinks to the free blocks, block aligned.
        Returns (0, []) if not even one token fits.
        """
        rid = req.request_id
        target = req.num_computed_tokens + n
        if self.device_kv.can_allocate(rid, target):
            return n, []
        short = self.device_kv.blocks_needed(rid, target) - self.device_kv.num_free_blocks
        victims: list[Request] = []
        for victim in reversed(resident):
            if short <= 0 or victim is req or rank[victim.request_id] <= rank[rid]:
                break
            victims.append(victim)
            # Only blocks it alone holds come free; shared prefix blocks stay.
            short -= self.device_kv.num_releasable(victim.request_id)
        if short <= 0:
            return n, victims
        room = (
            len(self.device_kv.block_table(rid)) + self.device_kv.num_free_blocks
        ) * self.block_size
        fit = min(n, room - req.num_computed_tokens)
        if fit < n and fit > 0 and req.num_computed_tokens + fit < req.num_tokens:
            end = (req.num_computed_tokens + fit) // self.block_size * self.block_size
            fit = end - req.num_computed_tokens
        return (fit, []) if fit > 0 else (0, [])

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

    def _order_key(self, req: Request, now: float) -> tuple:
        """The policy's order, except that a request whose KV was discarded
        ``max_recompute_evictions`` times is protected: it ranks ahead of every unprotected
        request of its priority class, and protected ones rank by arrival.

        Why: policies that re-rank over time (mlfq demotion and starvation promotion, alise
        re-estimates) can otherwise livelock under recompute preemption: two requests that
        do not fit together take turns evicting each other and each loses its work before it
        finishes (hypothesis found one). With protection every request is evicted by
        recompute at most that many times by its own class, and the protected set has a
        fixed order, so its head always runs to completion."""
        key = self.policy.sort_key(req, now)
        if req.num_recomputes >= self.config.max_recompute_evictions:
            return (key[0], 0, (req.arrival_time, req.request_id))
        return (key[0], 1, key[1:])

    def _add_chunk(self, req: Request, n: int, out: SchedulerOutput) -> None:
        self.device_kv.allocate(req.request_id, req.num_computed_tokens + n)
        start = req.num_computed_tokens
        if self.caching:
            # The chunk writes K/V at start .. start + n: never into a shared or cached block.
            self.device_kv.check_writable(req.request_id, start, start + n)
        tokens = req.token_slice(start, start + n)
        out.chunks.append(
            ScheduledChunk(
                request=req,
                token_ids=tokens,
                start_pos=start,
                block_table=self.device_kv.block_table(req.request_id),
                sample=start + n == req.num_tokens,
                table_stamp=self.device_kv.table_stamp(req.request_id),
            )
        )

    # ------------------------------------------------------------------ prefix cache
    @property
    def prefix_stats(self):
        return self.prefix.stats

    def block_names(self, req: Request, num_tokens: int) -> list[bytes]:
        """The request's block names, extended to its full blocks within ``num_tokens``."""
        return self.prefix.names(req, num_tokens)

    def cache_stats(self) -> dict[str, int | float]:
        """Prefix-cache figures for worker stats and /metrics (counters are cumulative)."""
        return self.prefix.stats_dict()

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
        req.num_recomputes += 1
        self.prefix.recomputes(req.request_id)
        req.status = RequestStatus.PREEMPTED
        self.waiting.append(req)

    def _swap_out(self, req: Request, out: SchedulerOutput, ahead: bool = False) -> bool:
        """Move a request that left ``running`` to the host tier; False if it cannot.

        ``ahead``: a proactive offload, which the runner may overlap with the forward pass
        (its device blocks are not reused before the next iteration).
        """
        host = self.host_kv
        if (
            host is None
            # Swap-ins and swap-outs never share an iteration: host blocks a swap-in just
            # released could be overwritten by a swap-out that the runner copies first.
            or out.swaps_in
            or self.config.preemption_mode != "swap"
            or req.num_computed_tokens == 0
            or not host.can_allocate(req.request_id, req.num_computed_tokens)
        ):
            return False
        export = self.device_kv.export(req.request_id, req.num_computed_tokens)
        dst = host.reserve_import(req.request_id, req.num_computed_tokens)
        copies = out.offload if ahead else out.swap_out
        copies.append(BlockCopy("device", export.block_ids, tuple(dst)))
        host.commit_import(req.request_id)
        self.prefix.swapped_out(req)
        # Safe to free now: the runner copies swap-outs before the forward pass, and an
        # offload's blocks are not handed out again until the next iteration.
        self.device_kv.release_export(export)
        self.swap.out_blocks += len(dst)
        self.offload.forget(req.request_id)
        req.status = RequestStatus.SWAPPED
        self.swapped.append(req)
        return True

    def _swap_in(self, req: Request, out: SchedulerOutput, ahead: bool = False) -> None:
        """Bring a swapped request's blocks back; the caller checked there is room.

        ``ahead``: a prefetch for a later iteration, not part of this iteration's batch.
        """
        assert self.host_kv is not None
        export = self.host_kv.export(req.request_id, req.num_computed_tokens)
        dst = self.device_kv.reserve_import(req.request_id, req.num_computed_tokens)
        copies = out.prefetch if ahead else out.swap_in
        copies.append(BlockCopy("host", export.block_ids, tuple(dst)))
        self.device_kv.commit_import(req.request_id)
        # The host blocks stay held until the runner copied them: no swap-out shares the
        # iteration, but a prefix-cache write-back may (prefix_cache.py).
        self.prefix.hold(export)
        self.prefix.swapped_in(req)
        self.swap.in_blocks += len(dst)
        self.offload.note_swap_in(req.request_id, self.iteration)
        self.swapped.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    # ------------------------------------------------------------------ feedback
    def on_launched(self, sched_out: SchedulerOutput) -> None:
        """The runner has queued this iteration (async scheduling): its K/V will be in the
        blocks before any later iteration runs, so progress advances now, and each
        sampling chunk leaves a pending token for ``update_from_output`` to resolve."""
        assert not sched_out.launched, "on_launched twice for one iteration"
        sched_out.launched = True
        for chunk in sched_out.chunks:
            req = chunk.request
            if req.is_finished:
                continue
            req.num_computed_tokens += chunk.num_tokens
            if chunk.sample:
                req.num_pending_tokens += 1

    def update_from_output(
        self, sched_out: SchedulerOutput, runner_out: RunnerOutput, seconds: float | None = None
    ) -> list[TokenEvent]:
        """Apply one iteration's results. ``seconds``: how long it took (default: the
        clock since ``schedule()``); each request in it is charged that much service.
        Without a prior ``on_launched`` (synchronous stepping) it advances progress too."""
        now = self.clock()
        if seconds is None:
            seconds = max(now - self._scheduled_at, 0.0)
        if not sched_out.launched:
            self.on_launched(sched_out)
        self.swap.add_io(runner_out.swap)
        self.prefix.release_holds()  # the iteration's copies have run
        events: list[TokenEvent] = []
        for chunk in sched_out.chunks:
            req = chunk.request
            if req.is_finished:
                continue  # aborted or stopped while the iteration ran
            if req.status is RequestStatus.RUNNING:
                self.prefix.computed(req)  # name the full blocks whose K/V are computed
            self.policy.on_service(req, chunk.num_tokens, seconds, now)
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
        self.offload.forget(request_id)
        self.prefix.forget(request_id)
        req.status = status
        req.num_pending_tokens = 0  # a token still on the device is dropped (async)
        self.policy.on_finish(req)
        return req

    def abort(self, request_id: str) -> Request | None:
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)
