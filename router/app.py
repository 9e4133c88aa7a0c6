"""The router: OpenAI-compatible HTTP front end (aiohttp; imports no torch).

A request's life here:

1. The handler parses and validates the body (``openai_api``: 4xx with OpenAI's error
   JSON on anything wrong), applies the chat template and tokenizes (``FastTokenizer``).
2. Backpressure: past ``max_in_flight`` requests it answers 429 with Retry-After.
3. Dispatch: the connected worker with a free slot and the lowest virtual usage, less a
   bonus for the prompt's prefix it holds cached (``router.prefix_affinity``), gets a
   ``submit``.
4. Token frames come back; the router detokenizes incrementally (never half a UTF-8
   character), applies stop strings (and tells the worker to abort on a match), and
   writes SSE chunks or, without ``stream``, one JSON body at the end. With ``n > 1`` each
   choice is its own worker request (``{id}-{i}``); choices 1..n-1 are submitted once
   choice 0's first token is back, so they hit its cached prompt blocks (``_run``).
5. A client that disconnects, or a request past ``request_timeout``, is aborted at the
   worker, which frees its KV blocks within one iteration. A worker that dies ends its
   requests with an explicit error (an SSE error event, or HTTP 502).

Live migration (``router.migration``): every request in flight is tracked as a
``Flight`` (its route, decode worker and tokens so far); a move switches its owner
without a gap in the stream; the rebalancer and drain pick what to move.

Endpoints: POST /v1/completions, /v1/chat/completions, /generate, /tokenize, /detokenize;
GET /v1/models, /v1/models/{id}, /health, /metrics, /openapi.json (``router.openapi``); the
admin endpoints of ``router.admin`` (/admin/migrate, /admin/drain/{worker}, /admin/workers).
Who may call which is ``router.auth``'s middleware (API, admin and metrics keys; per-key
concurrency).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from router import openapi
from router.admin import Admin
from router.admission import DISPATCH, AdmissionQueue
from router.auth import Auth, AuthConfig
from router.metrics import RouterMetrics
from router.migration import MigrationConfig, Migrator
from router.openai_api import (
    ApiError,
    Limits,
    ParsedRequest,
    check_text,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_generate,
    parse_tokenize,
)
from router.prefix_affinity import PrefixAffinity
from router.tools import chat_message
from router.workers import InOrder, Route, WorkerClient
from tandem import protocol
from tandem.detokenizer import IncrementalDetokenizer, special_token_ids
from tandem.registry import make_registry
from tandem.sched.cost_model import CostModel
from tandem.tokenizer import FastTokenizer

log = logging.getLogger("tandem.router")
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"


@dataclass
class _Choice:
    """One choice of an OpenAI request, as it is streamed: its text so far, logprob items,
    finish reason, token count and when its first token came."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    lp_items: list[Any] = field(default_factory=list)
    finish: str | None = None
    n_out: int = 0
    first_at: float | None = None
    cached_tokens: int = 0  # of the prompt, from the prefix cache (the first token's item)


@dataclass(frozen=True)
class RouterConfig:
    model_dir: str
    served_model_name: str
    workers: tuple[str, ...] = ()
    registry_url: str | None = None
    max_in_flight: int = 4096
    request_timeout: float = 600.0
    max_reruns: int = 2  # times a request is continued elsewhere after its worker died
    cost_model: str | None = None  # JSON CostModel for skip-join admission (default: generic)
    migration: MigrationConfig = MigrationConfig()
    dispatch: str = "prefix"  # prefix (usage less cached-prefix bonus) | usage | round-robin
    max_body_bytes: int = 16 * 2**20  # larger request bodies get 413
    header_timeout: float = 15.0  # a connection must send a whole request head within this
    body_timeout: float = 30.0  # ... and its body within this once the head is in
    max_prompt_tokens: int | None = None  # longer prompts get 400 (None: the context)
    max_tokens_limit: int | None = None  # larger max_tokens get 400 (None: what fits)
    auth: AuthConfig = AuthConfig()  # API, admin and metrics keys (router.auth)
    cluster_secret: bytes | None = field(default=None, repr=False)  # tandem.auth, to workers

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH:
            raise ValueError(
                f"--dispatch must be one of {', '.join(DISPATCH)}, got {self.dispatch!r}"
            )
        if not self.workers and not self.registry_url:
            raise ValueError(
                "give worker addresses (--worker HOST:PORT) or a registry (--registry URL)"
            )
        if self.max_in_flight < 1 or self.request_timeout <= 0:
            raise ValueError("max_in_flight must be >= 1 and request_timeout > 0")
        if self.max_body_bytes < 1024:
            raise ValueError(
                f"--max-body-mb must allow at least 1 KiB, got {self.max_body_bytes} bytes"
            )
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("--header-timeout and --body-timeout must be > 0")
        for flag, value in (("--max-prompt-tokens", self.max_prompt_tokens),
                            ("--max-tokens-limit", self.max_tokens_limit)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizer = FastTokenizer(config.model_dir)
        self.max_token_chars = max(
            map(len, self.tokenizer.backend_tokenizer.get_vocab()), default=1
        )
        # Parsing (JSON, chat template, tokenization) runs here, off the event loop: a huge
        # prompt must not stall /health and every other stream while it is tokenized.
        self._parse_pool = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tandem-parse"
        )
        self.special_ids = special_token_ids(self.tokenizer)
        self.registry = make_registry(config.registry_url) if config.registry_url else None
        cost = CostModel.load(config.cost_model) if config.cost_model else None
        self.admission = AdmissionQueue(
            lambda: [w for w in self.workers if w.role != "prefill" and not w.draining],
            cost_model=cost,
            dispatch=config.dispatch,
        )
        self.metrics = RouterMetrics()
        self.affinity = PrefixAffinity(self.metrics)  # cache-aware dispatch
        self.migrator = Migrator(
            config.migration, lambda: self.workers, self.metrics, self.admission.wake
        )
        self.workers = [self._client(a) for a in config.workers]
        self.in_flight = 0
        self._ids = itertools.count()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, app: web.Application) -> None:
        await asyncio.gather(*(w.connect() for w in self.workers))
        self._static = {w.address for w in self.workers}
        self._connecting: set[str] = set()
        self._tasks = [asyncio.create_task(self._keep_connected())]
        self.migrator.start_background()
        if self.registry is not None:
            await self._sync_registry()
            self._tasks.append(asyncio.create_task(self._watch_registry()))

    async def stop(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        await self.migrator.close()
        for w in self.workers:
            await w.close()
        if self.registry is not None:
            await self.registry.close()
        self._parse_pool.shutdown(wait=False, cancel_futures=True)

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._sync_registry()
            except Exception as e:  # registry briefly unreachable: keep what we have
                log.warning("registry read failed: %s", e)

    async def _sync_registry(self) -> None:
        """Connect to newly registered workers; drop those whose entry expired."""
        assert self.registry is not None
        live = {i.address for i in await self.registry.workers()}  # prefill, decode, colocated
        known = {w.address for w in self.workers}
        for address in live - known:
            client = self._client(address)
            self.workers.append(client)
            asyncio.create_task(self._connect_quietly(client))
        for w in [
            w for w in self.workers if w.address not in live and w.address not in self._static
        ]:
            self.workers.remove(w)
            await w.close()  # its in-flight requests are re-run on the others

    def _client(self, address: str) -> WorkerClient:
        client = WorkerClient(address, self.config.cluster_secret)
        client.listener = self.migrator.on_reply
        return client

    async def _connect_quietly(self, client: WorkerClient, timeout: float = 10.0) -> None:
        """One connection attempt; failures are retried by ``_keep_connected``."""
        if client.address in self._connecting:
            return
        self._connecting.add(client.address)
        try:
            await client.connect(timeout=timeout)
            self.admission.wake()  # requests waiting for a slot may go now
        except protocol.ProtocolVersionError as e:  # retried too, but it needs an upgrade
            log.warning("%s", e)
        except Exception as e:  # refused, reset mid-hello, bad hello: try again later
            log.info("worker %s not reachable yet: %s", client.address, e)
        finally:
            self._connecting.discard(client.address)

    async def _keep_connected(self) -> None:
        """Reconnect every known worker that is down (static ones, and registered ones until
        their registry entry expires)."""
        while True:
            await asyncio.sleep(1.0)
            for w in list(self.workers):
                if not w.connected:
                    await self._connect_quietly(w, timeout=0.5)

    @property
    def max_model_len(self) -> int:
        lens = [w.hello["max_model_len"] for w in self.workers if w.hello]
        return min(lens) if lens else 0

    @property
    def vocab_size(self) -> int:
        sizes = [w.hello["vocab_size"] for w in self.workers if w.hello]
        return min(sizes) if sizes else self.tokenizer.vocab_size

    # ------------------------------------------------------------------ handlers
    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/generate", self.generate),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model_id:.+}", self.model_card),
            web.post("/tokenize", self.tokenize),
            web.post("/detokenize", self.detokenize),
            web.get("/health", self.health),
            web.get("/health/ready", self.health),
            web.get("/health/live", self.liveness),
            web.get("/metrics", self.metrics_endpoint),
            *Admin(self.migrator).routes(),
        ]

    def readiness(self) -> tuple[bool, str]:
        """(servable, why not): a request can be served only by a connected colocated worker,
        or by a connected prefill worker together with a connected decode worker."""
        roles = {w.role for w in self.workers if w.connected and not w.draining}
        if "colocated" in roles or {"prefill", "decode"} <= roles:
            return True, ""
        if not roles:
            return False, "no worker is connected"
        if "decode" in roles:
            return False, "no prefill worker is connected (the decode pool needs one)"
        return False, "no decode worker is connected (the prefill pool needs one)"

    async def health(self, request: web.Request) -> web.Response:
        """Readiness: 200 only when a request can be served; 503 saying what is missing."""
        ready, why = self.readiness()
        roles: dict[str, int] = {}
        for w in self.workers:
            if w.connected:
                roles[w.role] = roles.get(w.role, 0) + 1
        body: dict[str, Any] = {
            "status": "ok" if ready else "unavailable",
            "workers": sum(roles.values()),
            "roles": roles,
        }
        if not ready:
            body["reason"] = why
        return web.json_response(body, status=200 if ready else 503)

    async def liveness(self, request: web.Request) -> web.Response:
        """Liveness: the router's event loop answers (workers or not)."""
        return web.json_response({"status": "alive"})

    def _card(self) -> dict[str, Any]:
        return {
            "id": self.config.served_model_name,
            "object": "model",
            "created": 0,
            "owned_by": "tandem",
            "max_model_len": self.max_model_len,
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]})

    async def model_card(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{id}``: the served model's card, or 404 (OpenAI JSON)."""
        model_id = request.match_info["model_id"]
        if model_id != self.config.served_model_name:
            return _error(ApiError(404, f"model {model_id!r} does not exist", "model"))
        return web.json_response(self._card())

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /tokenize`` (``openai_api.parse_tokenize``)."""
        return await self._answer(request, parse_tokenize)

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /detokenize`` (``openai_api.parse_detokenize``)."""
        return await self._answer(request, parse_detokenize)

    async def _answer(self, request: web.Request, fn) -> web.Response:
        """A body answered by ``fn(body, tokenizer, limits)`` on the parse pool."""
        try:
            self._require_worker()  # limits (max_model_len, vocab) come from the workers
            raw = await _body(request, self.config.body_timeout, self.config.max_body_bytes)
            out = await asyncio.get_running_loop().run_in_executor(
                self._parse_pool, _parse_body, raw, lambda b: fn(b, self.tokenizer, self.limits())
            )
        except ApiError as e:
            return _error(e)
        return web.json_response(out)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        stats = {w.address: w.stats for w in self.workers}
        text = self.metrics.render(stats, self.admission.lengths())
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        def parse(body: Any) -> ParsedRequest:
            if chat:
                return parse_chat(body, self.tokenizer, self.limits())
            return parse_completion(body, self.tokenizer, self.limits())

        return await self._accept(request, parse, self._run)

    def limits(self) -> Limits:
        c = self.config
        return Limits(
            c.served_model_name,
            self.max_model_len,
            self.vocab_size,
            self.max_token_chars,
            max_prompt_tokens=c.max_prompt_tokens,
            max_tokens=c.max_tokens_limit,
        )

    async def _accept(self, request: web.Request, parse, run) -> web.StreamResponse:
        """Validate (``parse``: body -> ParsedRequest) and admit, answering 4xx/5xx JSON on
        refusal; then ``run`` it, counting it in flight until it ends."""
        try:
            self._require_worker()
            raw = await _body(request, self.config.body_timeout, self.config.max_body_bytes)
            parsed = await asyncio.get_running_loop().run_in_executor(
                self._parse_pool, _parse_body, raw, parse
            )
            self._admit()
        except ApiError as e:
            self.metrics.requests["rejected"] += 1
            return _error(e)
        try:
            return await run(request, parsed)
        finally:
            self.in_flight -= 1

    def _require_worker(self) -> None:
        """503 (retryable) while no worker is connected: limits such as max_model_len come
        from the workers, so nothing can be validated without one."""
        ready, why = self.readiness()
        if not ready:
            raise ApiError(503, f"no worker is available: {why}")

    def _admit(self) -> None:
        if self.in_flight >= self.config.max_in_flight:
            raise ApiError(429, f"server busy: {self.in_flight} requests in flight; retry later")
        self._require_worker()  # again: workers may have gone while the body was parsed
        self.in_flight += 1

    async def _run(self, request: web.Request, p: ParsedRequest) -> web.StreamResponse:
        """Serve ``p.n`` choices of one prompt and answer with one body or one SSE stream.

        Choice 0 is submitted first; choices 1..n-1 are submitted once its first token is
        back (or it ended), so the prompt's full blocks are already in the worker's prefix
        cache and the later choices reuse them instead of recomputing (shared blocks, never
        copied). Each choice is its own request at the workers (``{rid}-{i}``), with its own
        reruns and migration; an error in one aborts them all. Usage counts the prompt once
        and sums completion tokens over the choices."""
        rid = f"{'chatcmpl' if p.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        start = time.monotonic()  # JCT and the timeout include the wait for admission
        obj = "chat.completion.chunk" if p.chat else "text_completion"
        response: web.StreamResponse | None = None
        lock = asyncio.Lock()  # one SSE event at a time on the wire

        async def emit(index: int, delta: str, finish: str | None, new_lp: Any) -> None:
            if response is not None and (delta or finish is not None or new_lp is not None):
                content = {"content": delta} if p.chat else delta
                chunk = self._chunk(rid, created, obj, content, finish, new_lp, p, index)
                async with lock:
                    await _sse(response, chunk)

        first_back = asyncio.Event()
        try:
            first = self._dispatch_choice(rid, p, 0)
            first_route = await first
        except ApiError as e:
            self.metrics.requests["error"] += 1
            return _error(e)
        tasks = [asyncio.create_task(self._choice(p, rid, 0, start, emit, first_back, first_route))]
        try:
            if p.stream:
                response = web.StreamResponse(
                    headers={"Content-Type": SSE_CONTENT_TYPE, "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
                request[_STREAMING] = True
                if p.chat:
                    for i in range(p.n):
                        role = {"role": "assistant", "content": ""}
                        await _sse(response, self._chunk(rid, created, obj, role, None, None, p, i))
            if p.n > 1:
                await asyncio.wait([tasks[0], asyncio.create_task(first_back.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                tasks += [
                    asyncio.create_task(self._choice(p, rid, i, start, emit, None, None))
                    for i in range(1, p.n)
                ]
            choices = await asyncio.gather(*tasks)
            completion = sum(c.n_out for c in choices)
            usage = {"prompt_tokens": len(p.prompt_token_ids), "completion_tokens": completion,
                     "total_tokens": len(p.prompt_token_ids) + completion,
                     # OpenAI's field; choice 0 ran the prompt first, later ones reuse it.
                     "prompt_tokens_details": {"cached_tokens": choices[0].cached_tokens}}  # fmt: skip
            if response is not None:
                if p.include_usage:
                    await _sse(response, {"id": rid, "object": obj, "created": created,
                                          "model": self.config.served_model_name, "choices": [], "usage": usage})  # fmt: skip
                await response.write(b"data: [DONE]\n\n")
                return response
            return web.json_response(self._final(rid, created, choices, usage, p))
        except ApiError as e:
            if response is None:
                return _error(e)
            async with lock:
                await _sse(response, e.body())
            return response
        finally:
            for t in tasks:
                t.cancel()  # on error or disconnect: each aborts its request at the workers

    async def _dispatch_choice(self, rid: str, p: ParsedRequest, index: int):
        cid = rid if p.n == 1 else f"{rid}-{index}"
        return await self._dispatch(cid, replace(p, params=p.choice_params(index)))

    async def _choice(
        self, p: ParsedRequest, rid: str, index: int, start: float, emit,
        first_back: asyncio.Event | None, route,
    ) -> _Choice:  # fmt: skip
        """One choice from dispatch (unless ``route`` is given) to its finish: detokenize,
        apply stop strings, re-run on another worker if its worker dies; every update goes
        to ``emit``. Sets ``first_back`` once its first token (or its end) is back."""
        cid = rid if p.n == 1 else f"{rid}-{index}"
        wire = cid  # the id on the wire: a re-run gets a fresh one ("cid~n")
        if route is None:
            try:
                route = await self._dispatch_choice(rid, p, index)
            except ApiError:
                self.metrics.requests["error"] += 1
                raise
        worker, queue = route
        params = p.choice_params(index)
        pc = replace(p, params=params) if index else p
        flight = self.migrator.track(cid, wire, worker, len(p.prompt_token_ids), params.max_tokens)
        detok = IncrementalDetokenizer(
            self.tokenizer,
            p.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            special_ids=self.special_ids,
        )
        c = _Choice(index)
        outcome = "abort"
        out_ids: list[int] = []
        reruns = 0
        try:
            if p.echo_text:  # completions' echo: the prompt's text comes first
                c.text_parts.append(p.echo_text)
                await emit(index, p.echo_text, None, None)
            deadline = start + self.config.request_timeout
            order = InOrder()  # tokens may arrive on two sockets: deliver them in order
            while c.finish is None:
                try:
                    item = await order.get(queue, deadline)
                except asyncio.TimeoutError:
                    raise ApiError(
                        504, f"request timed out after {self.config.request_timeout:.0f}s"
                    ) from None
                new_ids, reason, error = item.new_token_ids, item.finish_reason, item.error
                logprobs = item.logprobs
                rerunnable = item.error_kind is not None and item.error_kind.rerunnable
                if rerunnable and reruns < self.config.max_reruns:
                    new_wire = f"{cid}~{reruns + 1}"
                    worker, queue = self._rerun(wire, new_wire, pc, out_ids, worker)
                    self.migrator.retrack(flight, new_wire, worker)
                    wire = new_wire
                    reruns += 1
                    order.restart(len(out_ids))
                    continue
                if error is not None:
                    kind = item.error_kind or protocol.ErrorKind.ENGINE
                    raise ApiError(kind.http_status, error)
                if item.cached_tokens is not None:
                    c.cached_tokens = item.cached_tokens
                out_ids.extend(new_ids)
                flight.n_out = len(out_ids)
                if new_ids and c.first_at is None:
                    c.first_at = time.monotonic()
                    self.metrics.ttft.observe(c.first_at - start)
                c.n_out += len(new_ids)
                update = detok.add_tokens(new_ids)
                delta = update.delta
                if update.stop_string is not None:
                    reason = "stop"
                    worker.abort(wire)
                elif reason is not None:
                    delta += detok.flush()
                new_lp = self._logprobs(new_ids, logprobs, p) if p.logprobs is not None else None
                if new_lp is not None:
                    c.lp_items.append(new_lp)
                c.finish = reason
                c.text_parts.append(delta)
                if first_back is not None and (new_ids or reason is not None):
                    first_back.set()
                await emit(index, delta, c.finish, new_lp)
            outcome = c.finish if c.finish in ("stop", "length") else "abort"
            n_prompt = len(p.prompt_token_ids) if index == 0 else 0
            self._observe(start, c.first_at, c.n_out, n_prompt)
            return c
        except ApiError:
            outcome = "error"
            worker.abort(wire)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            worker.abort(wire)  # the client went away: free the request everywhere
            raise
        finally:
            if first_back is not None:
                first_back.set()
            self._end(worker, cid, wire, outcome)

    def _end(self, worker: Route, rid: str, wire: str, outcome: str) -> None:
        """A request's stream is over (any outcome): free it at its workers, let the
        admission queue move, count the outcome."""
        if len(worker.clients) > 1:
            # Prefill + decode (+ a migration's destination): tell all it is over (the
            # decode worker may still hold an expectation if the request finished on its
            # first token).
            worker.abort(wire)
        worker.release(wire)
        self.migrator.untrack(rid)
        self.admission.wake()
        self.metrics.requests[outcome] += 1

    async def _dispatch(self, rid: str, p: ParsedRequest) -> tuple[Route, asyncio.Queue]:
        """Wait in the admission MLFQ for a slot on a decode (or colocated) worker, then
        submit (504 after the timeout)."""
        score = (
            self.affinity.scorer(p.prompt_token_ids) if self.config.dispatch == "prefix" else None
        )
        worker = self.admission.try_admit(affinity=score)
        if worker is not None:  # submitted before any await: the next pick sees it
            if score is not None:
                self.affinity.routed(worker, score)
            return self._route(worker, rid, p.prompt_token_ids, p.params, p.priority)
        try:
            worker, granted = await asyncio.wait_for(
                self.admission.admit(len(p.prompt_token_ids), p.priority, affinity=score),
                self.config.request_timeout,
            )
            if score is not None:
                self.affinity.routed(worker, score)
        except asyncio.TimeoutError:
            raise ApiError(
                504, f"no worker slot within {self.config.request_timeout:.0f}s"
            ) from None
        try:
            return self._route(worker, rid, p.prompt_token_ids, p.params, p.priority)
        finally:
            self.admission.submitted(worker, granted)

    def _route(self, worker: WorkerClient, rid: str, prompt: list[int], params, priority: int):
        """Submit to a colocated worker, or through a prefill worker to decode ``worker``.

        All or nothing: if anything fails before the submit is on the wire, every queue this
        request registered is released, so a failed submit never holds a worker slot."""
        try:
            return self._route_unchecked(worker, rid, prompt, params, priority)
        except ApiError:
            worker.release(rid)
            raise
        except ConnectionError as e:  # the worker went away between admission and submit
            worker.release(rid)
            raise ApiError(503, f"worker unavailable: {e}") from None
        except Exception as e:  # e.g. a message msgpack cannot encode: a bug, not the client's
            worker.abort(rid)  # releases it here; a decode worker told to expect it lets go
            log.exception("submit of %s failed", rid)
            raise ApiError(500, f"could not submit the request to a worker: {e}") from None

    def _route_unchecked(
        self, worker: WorkerClient, rid: str, prompt: list[int], params, priority: int
    ):
        msg = protocol.Submit(
            request_id=rid, prompt_token_ids=list(prompt), params=params, priority=priority
        )
        if worker.role != "decode":
            return Route([worker]), worker.submit(msg)
        prefills = [w for w in self.workers if w.connected and w.role == "prefill"]
        if not prefills:
            raise ApiError(503, "no prefill worker is available for the decode pool")
        prefill = min(
            prefills, key=lambda w: (w.stats.get("queued_prefill_tokens", 0), w.in_flight)
        )
        queue: asyncio.Queue = asyncio.Queue()
        worker.expect(rid, queue)  # before the prompt goes out: its tokens come back here
        prefill.submit(replace(msg, decode_kv=worker.hello["kv_address"]), queue)
        return Route([prefill, worker]), queue

    def _rerun(
        self, old_wire: str, new_wire: str, p: ParsedRequest, out_ids: list[int], dead: Route
    ) -> tuple[Route, asyncio.Queue]:
        """Continue a request whose worker died on another one, from where it stopped.

        The new prompt is the original prompt plus every token already streamed, and
        max_tokens is what remains, so the client's stream goes on without a gap or a
        repeat (greedy output is identical; sampled output stays valid). Raises 502 when
        no other worker is up.
        """
        dead.abort(old_wire)  # whichever part of the old route survived lets go of it
        dead.release(old_wire)
        serving = [
            w for w in self.workers if w.connected and w.role != "prefill" and not w.draining
        ]
        candidates = [w for w in serving if w not in dead.clients] or serving
        if not candidates:
            raise ApiError(502, f"worker lost and no other worker is available for {old_wire}")
        worker = min(candidates, key=lambda w: w.in_flight)
        left = p.params.max_tokens - len(out_ids)
        params = replace(
            p.params, max_tokens=max(left, 1), min_tokens=max(p.params.min_tokens - len(out_ids), 0)
        )
        self.metrics.reruns += 1
        log.warning(
            "re-running %s as %s on %s after %d tokens",
            old_wire,
            new_wire,
            worker.address,
            len(out_ids),
        )
        return self._route(worker, new_wire, p.prompt_token_ids + out_ids, params, p.priority)

    def _observe(self, start: float, first_at: float | None, n_out: int, n_prompt: int) -> None:
        end = time.monotonic()
        self.metrics.e2e.observe(end - start)
        if first_at is not None and n_out > 1:
            self.metrics.tpot.observe((end - first_at) / (n_out - 1))
        self.metrics.prompt_tokens += n_prompt
        self.metrics.generation_tokens += n_out

    def _logprobs(self, ids: list[int], logprobs: list | None, p: ParsedRequest) -> Any:
        if not logprobs:
            return None
        tok = self.tokenizer
        if p.chat:
            content = []
            for token, (lp, top) in zip(ids, logprobs, strict=False):
                text = tok.decode([token], skip_special_tokens=False)
                content.append({
                    "token": text, "logprob": lp, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": tok.decode([t], skip_special_tokens=False), "logprob": v,
                                      "bytes": list(tok.decode([t], skip_special_tokens=False).encode())} for t, v in top],
                })  # fmt: skip
            return {"content": content}
        return {
            "tokens": [tok.decode([t], skip_special_tokens=False) for t in ids],
            "token_logprobs": [lp for lp, _ in logprobs],
            "top_logprobs": [
                {tok.decode([t], skip_special_tokens=False): v for t, v in top}
                for _, top in logprobs
            ],
        }

    def _chunk(
        self, rid, created, obj, content, finish, logprobs, p: ParsedRequest, index: int = 0
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if p.chat:
            choice["delta"] = content if finish is None or content.get("content") else {}
        else:
            choice["text"] = content
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self.config.served_model_name,
            "choices": [choice],
        }

    def _final(
        self, rid, created, choices: list[_Choice], usage, p: ParsedRequest
    ) -> dict[str, Any]:
        out = []
        for c in choices:
            text = "".join(c.text_parts)
            if p.chat:
                logprobs = (
                    {"content": [x for item in c.lp_items for x in item["content"]]}
                    if p.logprobs is not None
                    else None
                )
                message, finish = chat_message(text, c.finish, p.tool_format, p.parallel_tool_calls)
                out.append({"index": c.index, "message": message, "logprobs": logprobs,
                            "finish_reason": finish})  # fmt: skip
            else:
                logprobs = None
                if p.logprobs is not None:
                    logprobs = {
                        k: [v for item in c.lp_items for v in item[k]]
                        for k in ("tokens", "token_logprobs", "top_logprobs")
                    }
                out.append({"index": c.index, "text": text, "logprobs": logprobs,
                            "finish_reason": c.finish})  # fmt: skip
        obj = "chat.completion" if p.chat else "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": self.config.served_model_name,
                "choices": out, "usage": usage}  # fmt: skip

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Native API: token ids in, token ids streamed out (SSE of {"token_ids": [...]})."""

        def parse(body: Any) -> ParsedRequest:
            return parse_generate(body, self.tokenizer, self.limits())

        return await self._accept(request, parse, self._generate)

    async def _generate(self, request: web.Request, p: ParsedRequest) -> web.StreamResponse:
        rid = f"gen-{uuid.uuid4().hex[:24]}"
        try:
            worker, queue = await self._dispatch(rid, p)
        except ApiError as e:
            self.metrics.requests["error"] += 1
            return _error(e)
        flight = self.migrator.track(rid, rid, worker, len(p.prompt_token_ids), p.params.max_tokens)
        response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        outcome = "abort"
        try:
            await response.prepare(request)
            request[_STREAMING] = True
            deadline = time.monotonic() + self.config.request_timeout
            order = InOrder()
            while True:
                try:
                    item = await order.get(queue, deadline)
                except asyncio.TimeoutError:
                    worker.abort(rid)
                    item = protocol.TokenItem.failed(
                        rid,
                        protocol.ErrorKind.TIMEOUT,
                        f"request timed out after {self.config.request_timeout:.0f}s",
                    )
                new_ids, reason, error = item.new_token_ids, item.finish_reason, item.error
                if error is not None:
                    outcome = "error"
                    await _sse(response, {"error": {"message": error}})
                    break
                flight.n_out += len(new_ids)
                await _sse(response, {"token_ids": new_ids, "finish_reason": reason})
                if reason is not None:
                    outcome = reason if reason in ("stop", "length") else "abort"
                    break
            await response.write(b"data: [DONE]\n\n")
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            worker.abort(rid)
            raise
        finally:
            self._end(worker, rid, rid, outcome)


async def _body(request: web.Request, timeout: float, max_bytes: int) -> bytes:
    """The whole body within ``timeout`` seconds (a client that trickles it is cut off),
    at most the app's ``client_max_size`` (413 past it)."""
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:.0f}s") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, f"request body is larger than the limit of {max_bytes} bytes (--max-body-mb)"
        ) from None


def _parse_body(raw: bytes, parse) -> ParsedRequest:
    """JSON decode, text check and ``parse`` (runs on the parse pool, off the loop)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    check_text(body)
    return parse(body)


def _error(e: ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return web.json_response(e.body(), status=e.status, headers=headers)


async def _sse(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")


ROUTER_KEY: web.AppKey[Router] = web.AppKey("router", Router)


_STREAMING = "tandem.streaming"  # request key: set once an SSE response is on the wire


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error the client sees is OpenAI's error JSON: aiohttp's own 404/405/413 and
    any unexpected exception (500, logged with its traceback here, never sent)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {
            404: f"no such endpoint: {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: "request body is larger than the limit (--max-body-mb)",
        }.get(e.status, e.reason)
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return web.json_response(
            ApiError(e.status, message).body(), status=e.status, headers=headers
        )
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        if request.get(_STREAMING):
            raise  # the stream is already open: aiohttp closes the connection
        return web.json_response(ApiError(500, "internal server error").body(), status=500)


def build_app(config: RouterConfig) -> web.Application:
    router = Router(config)
    # openai_errors outermost: a refusal by auth, and anything a handler raises, is JSON.
    auth = Auth(config.auth)
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[openai_errors, auth.middleware]
    )
    app[ROUTER_KEY] = router
    app.add_routes(router.routes())
    app.add_routes(openapi.routes(config.served_model_name, config.max_tokens_limit))
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    return app


def run_kwargs(config: RouterConfig) -> dict[str, Any]:
    """``web.run_app`` arguments that bound a connection's life before its request is in.

    aiohttp closes a connection still waiting for its request head once
    ``keepalive_timeout`` has passed since it opened (or since its last response): the
    header timeout. The body has ``body_timeout`` once the handler reads it."""
    return {"keepalive_timeout": config.header_timeout}
