"""Decode worker service. Today it runs in colocated mode: it accepts prompts, runs
stall-free chunked prefill and decode itself (the disaggregated prefill → decode KV
handoff arrives with the kvtransfer backends).

A request's life in this process:

1. A router connection sends ``submit``; the engine thread validates it and queues it
   (``engine.add_request``). A refused request gets one finished ``tokens`` item with an
   ``error`` at once, so the router never waits on it.
2. The engine thread runs ``engine.step()`` while any request is unfinished. Each
   iteration's new tokens go back as one ``tokens`` frame per router connection (many
   requests per frame).
3. A finished request's last item carries its ``finish_reason``; the engine has freed its
   KV blocks before the next iteration.
4. ``abort`` (the client went away, or a stop string matched at the router) or the router
   connection closing aborts the requests; their blocks are freed within one iteration.

Threads: asyncio owns the sockets; one engine thread owns the engine. They meet through
a thread-safe inbox (router → engine) and ``call_soon_threadsafe`` (engine → sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tandem import auth as cluster_auth
from tandem import protocol
from tandem.protocol import ErrorKind, Hello, Message, Stats, Submit, TokenItem, Tokens
from tandem.registry import Registry, WorkerInfo

if TYPE_CHECKING:  # type only: a worker serving FakeEngine never imports torch
    from tandem.engine.interface import Engine

log = logging.getLogger("tandem.decode_worker")

STATS_PERIOD_S = 1.0
# Entries of the prefix summary in each stats frame (kvcache ``prefix_summary``): short
# names of cached blocks at depths 1, 2, 4, 8, ... blocks, most recently used first.
PREFIX_SUMMARY_ENTRIES = 2048


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.requests: set[str] = set()
        self.closed = False


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 0,
        role: str = "colocated",
        registry: Registry | None = None,
        worker_id: str | None = None,
        advertise_host: str | None = None,
        ttl: float = 5.0,
        cluster_secret: bytes | None = None,
    ) -> None:
        self.engine = engine
        self.cluster_secret = cluster_secret  # tandem.auth: peers must prove it when set
        self.host, self.port, self.role = host, port, role
        self.registry, self.ttl = registry, ttl
        self.worker_id = worker_id or f"{role}-{uuid.uuid4().hex[:8]}"
        self.advertise_host = advertise_host or host
        self._heartbeat_task: asyncio.Task | None = None
        self.last_stats: dict[str, Any] = {}  # written by the engine thread only
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._owner: dict[str, _Conn] = {}  # request id -> connection (engine thread only)
        self._conns: set[_Conn] = set()  # every open router connection (for stats)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self._last_stats = 0.0

    # ------------------------------------------------------------------ asyncio side
    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.last_stats = self.stats()  # before the engine thread exists: safe
        self._thread.start()
        if self.registry is not None:
            await self.registry.register(self.info(), self.ttl)
            self._heartbeat_task = asyncio.create_task(self._heartbeat())
        return self.port

    def info(self) -> WorkerInfo:
        hello = self.hello_message()
        return WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            address=f"{self.advertise_host}:{self.port}",
            model=hello.model,
            capacity={"kv_blocks": hello.kv_blocks, "max_model_len": hello.max_model_len},
            load=dict(self.last_stats),
        )

    async def _heartbeat(self) -> None:
        """Renew the registry entry every ttl/3 with the current load; re-register if it expired."""
        assert self.registry is not None
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.registry.heartbeat(self.worker_id, dict(self.last_stats), self.ttl)
            except KeyError:
                await self.registry.register(self.info(), self.ttl)
            except Exception as e:  # registry briefly unreachable: keep serving, retry
                log.warning("registry heartbeat failed: %s", e)

    async def shutdown(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        if self.registry is not None:
            with contextlib.suppress(Exception):
                await self.registry.deregister(self.worker_id)
                await self.registry.close()
        self.stop()

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def run(self, on_ready: Callable[[int], None] | None = None) -> None:
        """Start, call ``on_ready(port)``, serve until SIGTERM or SIGINT, then ``shutdown()``:
        a worker stopped by its supervisor (docker stop, systemd, ``tandem serve``) leaves
        the registry at once instead of lingering there until its TTL runs out."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:  # before start(): a signal during start-up still deregisters
            loop.add_signal_handler(sig, stop.set)
        try:
            port = await self.start()
            if on_ready is not None and not stop.is_set():
                on_ready(port)
            serving = asyncio.create_task(self.serve_forever())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (serving, stopping):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.close()

    def hello_message(self) -> Hello:
        e = self.engine
        return Hello(
            role=self.role,
            model=e.config.model,
            compat=e.compat_hash,
            kv_blocks=e.config.cache.num_blocks,
            max_num_seqs=e.config.scheduler.max_num_seqs,
            max_model_len=e.config.scheduler.max_model_len,
            vocab_size=e.model_config.vocab_size,
            eos_token_ids=list(e.model_config.eos_token_ids),
            cache_salt=getattr(e, "cache_salt", None),
            device=e.config.device,
            dtype=e.config.dtype,
            block_size=e.config.cache.block_size,
            host_kv_blocks=e.config.cache.num_host_blocks,
            policy=e.config.scheduler.policy,
            max_num_batched_tokens=e.config.scheduler.max_num_batched_tokens,
            chunked_prefill=e.config.scheduler.enable_chunked_prefill,
            worker_id=self.worker_id,
            **self.extra_hello(),
        )

    def hello(self) -> dict[str, Any]:
        """``hello_message`` by field name (start-up summaries read it)."""
        return self.hello_message().as_dict()

    # Hooks for the prefill / decode roles (subclasses); the colocated worker needs none.
    def extra_hello(self) -> dict[str, Any]:
        """Role-specific ``Hello`` fields (``kv_address``, ``migration``)."""
        return {}

    def on_message(self, conn: _Conn, msg: Message) -> None:
        """A message the base service does not handle (asyncio thread)."""
        log.warning("ignoring message %r", msg.TYPE)

    def on_bad_message(self, conn: _Conn, e: protocol.BadMessage) -> None:
        """A frame of a known type with wrong fields (asyncio thread): a submit is
        answered with an error item, so the router does not wait on it."""
        if e.kind == Submit.TYPE:
            item = TokenItem.failed(e.request_id, ErrorKind.INVALID, str(e))
            self._post(lambda: self._send(conn, Tokens((item,))))
        else:
            log.warning("ignoring a bad %r message: %s", e.kind, e)

    def on_connection_closed(self, conn: _Conn) -> None:
        """Engine thread: a router connection closed; its requests are aborted."""
        self._abort(list(conn.requests))

    def after_step(self, outputs: list[Any]) -> None:
        """Engine thread, after the step's token frames were queued."""

    def on_unowned(self, request_id: str, item: TokenItem) -> None:
        """Engine thread: tokens of a request no router connection owns (yet)."""

    def on_tick(self) -> None:
        """Engine thread, about once per ``STATS_PERIOD_S`` even when idle (expiries)."""

    async def in_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread (which owns the engine) and await its result."""
        import concurrent.futures

        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the awaiting coroutine
                done.set_exception(e)

        self._post(run)
        return await asyncio.wrap_future(done)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = self.hello_message()
        if self.cluster_secret is not None:  # tandem.auth: the peer must prove the secret
            hello = dataclasses.replace(hello, challenge=cluster_auth.new_challenge())
        writer.write(protocol.encode(hello))
        if self.cluster_secret is not None:
            assert hello.challenge is not None
            peer = str(writer.get_extra_info("peername"))
            if not await cluster_auth.accept(
                reader, writer, self.cluster_secret, hello.challenge, peer
            ):
                writer.close()
                return
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            while True:
                try:
                    msg = await protocol.read_message(reader)
                except protocol.UnknownMessage as e:
                    log.warning("ignoring unknown message type %r", e.kind)
                    continue
                except protocol.BadMessage as e:
                    self.on_bad_message(conn, e)
                    continue
                if isinstance(msg, Submit):
                    self._post(lambda m=msg: self._submit(conn, m))
                elif isinstance(msg, protocol.Abort):
                    self._post(lambda ids=list(msg.request_ids): self._abort(ids))
                else:
                    self.on_message(conn, msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except protocol.ProtocolError as e:
            log.warning("closing connection: %s", e)
        finally:
            conn.closed = True
            self._conns.discard(conn)
            self._post(lambda: self.on_connection_closed(conn))
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _post(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake.set()

    def _send(self, conn: _Conn, msg: Message) -> None:
        """Called from the engine thread: hand a frame to the socket's loop."""
        if conn.closed or self._loop is None:
            return
        data = protocol.encode(msg)
        self._loop.call_soon_threadsafe(conn.writer.write, data)

    # ------------------------------------------------------------------ engine thread
    def _submit(self, conn: _Conn, msg: Submit) -> None:
        rid = msg.request_id
        try:
            self.engine.add_request(msg.prompt_token_ids, msg.params, rid, priority=msg.priority)
        except (ValueError, KeyError, TypeError) as e:
            self._send(conn, Tokens((TokenItem.failed(rid, ErrorKind.INVALID, str(e)),)))
            return
        self._owner[rid] = conn
        conn.requests.add(rid)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            out = self.engine.abort_request(rid)
            conn = self._owner.pop(rid, None)
            if conn is not None:
                conn.requests.discard(rid)
                if out is not None:
                    self._send(conn, Tokens((TokenItem(rid, [], "abort"),)))

    def _lose(self, conn: _Conn, rid: str, why: str) -> None:
        """Give the request up with a worker-lost error: the router re-runs it elsewhere."""
        self._owner.pop(rid, None)
        conn.requests.discard(rid)
        self._send(conn, Tokens((TokenItem.lost(rid, why),)))

    def _engine_loop(self) -> None:
        """Owns the engine. It must not die quietly: a failing callback fails only its own
        request; if the loop itself breaks, the worker closes every connection so routers
        see it as lost (and re-run its requests elsewhere) instead of waiting on it."""
        try:
            while not self._stop.is_set():
                self._engine_iteration()
        except BaseException:
            log.exception("engine thread died; closing the worker")
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._die)
            raise

    def _die(self) -> None:
        for conn in list(self._conns):
            conn.writer.close()
        self.stop()

    def _engine_iteration(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
            try:
                fn()
            except Exception:  # one bad message or callback must not stop the engine
                log.exception("engine-thread task failed")
        if self.engine.has_unfinished_requests():
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed iteration fails its requests loudly
                log.exception("engine step failed")
                self._fail_all(f"engine error: {e}")
                return
            batches: dict[int, tuple[_Conn, list[TokenItem]]] = {}
            for out in outputs:
                conn = self._owner.get(out.request_id)
                lp = (
                    out.logprobs[-len(out.new_token_ids) :]
                    if out.logprobs and out.new_token_ids
                    else None
                )
                # ``offset``: output position of these tokens; a request's tokens may
                # reach the router on two sockets (prefill, then decode), which reorders them.
                offset = len(out.token_ids) - len(out.new_token_ids)
                cached = out.num_cached_tokens if offset == 0 and out.new_token_ids else None
                item = TokenItem(
                    out.request_id, out.new_token_ids, out.finish_reason, None, lp, offset,
                    None, cached,
                )
                if conn is None:
                    self.on_unowned(out.request_id, item)
                    continue
                batches.setdefault(id(conn), (conn, []))[1].append(item)
                if out.finished:
                    self._owner.pop(out.request_id, None)
                    conn.requests.discard(out.request_id)
            for conn, items in batches.values():
                self._send(conn, Tokens(tuple(items)))
            try:
                self.after_step(outputs)
            except Exception:
                log.exception("after_step failed")
        else:
            self._wake.wait(timeout=STATS_PERIOD_S)
            self._wake.clear()
        now = time.monotonic()
        if now - self._last_stats >= STATS_PERIOD_S:
            self._last_stats = now
            try:
                self.on_tick()
            except Exception:
                log.exception("on_tick failed")
            # Computed here, on the engine thread; the heartbeat publishes this copy.
            self.last_stats = self.stats()
            self._broadcast(Stats(self.last_stats))

    def _fail_all(self, message: str) -> None:
        for rid, conn in list(self._owner.items()):
            self.engine.abort_request(rid)
            self._send(conn, Tokens((TokenItem.failed(rid, ErrorKind.ENGINE, message),)))
        self._owner.clear()

    def _broadcast(self, msg: Message) -> None:
        for conn in list(self._conns):
            self._send(conn, msg)

    def stats(self) -> dict[str, Any]:
        s = self.engine.scheduler
        swap = s.swap
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "swapped": len(s.swapped),
            "kv_free": s.device_kv.num_free_blocks,
            "kv_used": s.device_kv.pool.num_used,
            "preemptions": s.num_preemptions,
            "swapped_out_blocks": swap.out_blocks,
            "swapped_in_blocks": swap.in_blocks,
            "swapped_out_bytes": swap.out_bytes,
            "swapped_in_bytes": swap.in_bytes,
            "proactive_swap_outs": swap.proactive_outs,
            "swap_prefetches": swap.prefetches,
            "swap_in_wait_seconds": round(swap.in_wait_s, 6),
            "swap_out_wait_seconds": round(swap.out_wait_s, 6),
            "iterations": self.engine.num_iterations,
            **(s.cache_stats() if hasattr(s, "cache_stats") else {}),
            **self._prediction_error(),
            **self._prefix_summary(),
        }

    def _prediction_error(self) -> dict[str, Any]:
        """alise's output-length prediction error (issue 15); nothing for other policies."""
        policy = getattr(self.engine.scheduler, "policy", None)
        error = getattr(policy, "prediction_error", None)
        if error is None:
            return {}
        e = error()
        return {
            "predictions_scored": e["count"],
            "prediction_relative_error": round(e["mean_relative_error"], 6),
        }

    def _prefix_summary(self) -> dict[str, Any]:
        s = self.engine.scheduler
        if not getattr(s, "caching", False):
            return {}
        return {"prefix_summary": s.device_kv.prefix_summary(PREFIX_SUMMARY_ENTRIES)}
