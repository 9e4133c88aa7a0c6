"""The router's side of a worker connection (pure asyncio; no torch).

One persistent TCP connection per worker. A reader task routes each ``tokens`` item to
the queue of its request and keeps the worker's latest ``stats`` (with ``up`` 1). If the
connection drops, ``stats`` becomes ``{"up": 0}``: a dead worker's last load (blocks used,
requests running) must not linger in ``/metrics`` or in dispatch decisions as if it were
current. Every request in flight on it gets an error item, so no stream hangs — except a
request only expected here as a migration's destination (``expect_migration``): it still
runs on its source, whose migration then fails and keeps it.

Messages are ``tandem.protocol`` dataclasses. Migration replies (``Migrated``,
``MigrateFailed``) go to ``listener(client, msg)``; ``Migrated`` first drops the request's queue here, as ``handoff`` does: every token this
worker sent for it came before the reply on this socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from tandem import auth as cluster_auth
from tandem import protocol
from tandem.protocol import Abort, Expect, Hello, Message, Submit, TokenItem, Unexpect

log = logging.getLogger("tandem.router")

DOWN_STATS: dict[str, Any] = {"up": 0}  # shared, never mutated: stats are replaced whole


class WorkerClient:
    def __init__(self, address: str, cluster_secret: bytes | None = None) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"worker address must be HOST:PORT, got {address!r}")
        self.address = address
        self.host, self.port = host, int(port)
        # The worker's ``Hello`` fields by name (``Hello.as_dict``) while connected.
        self.hello: dict[str, Any] | None = None
        # The latest ``stats`` frame plus ``up``; only ``{"up": 0}`` while not connected.
        self.stats: dict[str, Any] = DOWN_STATS
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._incoming: set[str] = set()  # expected as a migration destination, not yet moved
        self.listener: Callable[[WorkerClient, Message], None] | None = None
        self.draining = False  # set by the router: no new requests, migrate everything off
        self._secret = cluster_secret  # tandem.auth: proven in the hello when set

    @property
    def connected(self) -> bool:
        return self._writer is not None and self.hello is not None

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    async def connect(self, timeout: float = 120.0) -> None:
        """Connect, retrying until the worker listens (it may still be loading weights)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                break
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise ConnectionError(
                        f"worker {self.address} did not start listening in {timeout:.0f}s"
                    ) from None
                await asyncio.sleep(0.2)
        try:
            hello = await protocol.read_message(reader)
        except protocol.ProtocolVersionError as e:
            writer.close()
            raise protocol.ProtocolVersionError(
                e.theirs, e.ours, peer=f"worker {self.address}"
            ) from None
        except protocol.ProtocolError as e:
            writer.close()
            raise protocol.ProtocolError(f"refusing worker {self.address}: {e}") from e
        if not isinstance(hello, Hello):
            writer.close()
            raise protocol.ProtocolError(f"worker {self.address} did not say hello")
        hello_fields = hello.as_dict()
        try:
            await cluster_auth.answer(reader, writer, self._secret, hello_fields, self.address)
        except (protocol.ProtocolError, asyncio.TimeoutError) as e:
            writer.close()
            if isinstance(e, cluster_auth.ClusterAuthError):
                log.warning("%s", e)
            raise
        self.hello, self._writer = hello_fields, writer
        self.stats = {"up": 1}
        self._reader_task = asyncio.create_task(self._read_loop(reader))

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
        self._writer = None

    def submit(self, msg: Submit, q: asyncio.Queue | None = None) -> asyncio.Queue:
        if self._writer is None:
            raise ConnectionError(f"worker {self.address} is not connected")
        frame = protocol.encode(msg)  # first: a message that cannot be encoded holds nothing
        q = q if q is not None else asyncio.Queue()
        self._queues[msg.request_id] = q
        self._writer.write(frame)
        return q

    @property
    def role(self) -> str:
        return (self.hello or {}).get("role", "colocated")

    def expect(self, request_id: str, q: asyncio.Queue) -> None:
        """Tell a decode worker that ``request_id``'s KV will come from a prefill worker;
        its tokens will arrive on this connection, into ``q``."""
        if self._writer is None:
            raise ConnectionError(f"worker {self.address} is not connected")
        frame = protocol.encode(Expect(request_id))
        self._queues[request_id] = q
        self._writer.write(frame)

    def expect_migration(self, request_id: str, q: asyncio.Queue) -> None:
        """``expect`` for a migration's destination: until ``migration_landed`` the request
        is not lost if this worker is."""
        self.expect(request_id, q)
        self._incoming.add(request_id)

    def migration_landed(self, request_id: str) -> None:
        self._incoming.discard(request_id)

    def queue_of(self, request_id: str) -> asyncio.Queue | None:
        return self._queues.get(request_id)

    def send(self, msg: Message) -> None:
        if self._writer is None:
            raise ConnectionError(f"worker {self.address} is not connected")
        self._writer.write(protocol.encode(msg))

    def unexpect(self, request_id: str) -> None:
        """Withdraw a migration's ``expect`` (the migration failed; the request lives on)."""
        self.release(request_id)
        if self._writer is not None:
            self._writer.write(protocol.encode(Unexpect(request_id)))

    def abort(self, request_id: str) -> None:
        self.release(request_id)
        if self._writer is not None:
            self._writer.write(protocol.encode(Abort((request_id,))))

    def release(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._incoming.discard(request_id)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    msg = await protocol.read_message(reader)
                except (protocol.UnknownMessage, protocol.BadMessage) as e:
                    log.warning("worker %s: ignoring a frame: %s", self.address, e)
                    continue
                if isinstance(msg, protocol.Tokens):
                    for item in msg.items:
                        q = self._queues.get(item.request_id)
                        if q is not None:
                            q.put_nowait(item)
                            if item.finished:
                                self._queues.pop(item.request_id, None)
                elif isinstance(msg, protocol.Stats):
                    self.stats = {**msg.values, "up": 1}
                elif isinstance(msg, (protocol.Handoff, protocol.Migrated)):
                    # The request now lives on another worker; nothing more comes from here.
                    self._queues.pop(msg.request_id, None)
                    if isinstance(msg, protocol.Migrated) and self.listener is not None:
                        self.listener(self, msg)
                elif isinstance(msg, protocol.MigrateFailed) and self.listener is not None:
                    self.listener(self, msg)
        except (asyncio.IncompleteReadError, ConnectionError, protocol.ProtocolError) as e:
            log.warning("lost worker %s: %s", self.address, e)
        finally:
            self._writer = None
            self.hello = None
            self.stats = DOWN_STATS
            for rid, q in list(self._queues.items()):
                if rid not in self._incoming:
                    q.put_nowait(lost_item(rid, self.address))
            self._queues.clear()
            self._incoming.clear()


def lost_item(request_id: str, address: str) -> TokenItem:
    """The error item that ends (or re-runs) a request whose worker went away."""
    return TokenItem.lost(request_id, f"worker {address} disconnected")


class Route:
    """The workers one request touches: its colocated worker, or its prefill worker and
    the decode worker that takes it over. Aborts and releases go to all of them."""

    def __init__(self, clients: list[WorkerClient]) -> None:
        self.clients = clients

    @property
    def address(self) -> str:
        return " -> ".join(c.address for c in self.clients)

    def abort(self, request_id: str) -> None:
        for c in self.clients:
            c.abort(request_id)

    def release(self, request_id: str) -> None:
        for c in self.clients:
            c.release(request_id)

    def add(self, client: WorkerClient) -> None:
        """A migration's destination joins: aborts reach it too while the move is on."""
        if client not in self.clients:
            self.clients.append(client)

    def remove(self, client: WorkerClient) -> None:
        if client in self.clients:
            self.clients.remove(client)


class InOrder:
    """Puts one request's token items back in output order.

    Items carry the output offset of their first token (``offset``). In disaggregated mode
    the first token comes on the prefill worker's socket and the rest on the decode
    worker's, so they can arrive swapped. Items without an offset (errors, aborts) pass at
    once. ``restart(n)`` starts a new attempt whose offsets count from 0 again, after the
    ``n`` tokens already delivered.
    """

    def __init__(self) -> None:
        self.base = 0
        self.next = 0
        self.pending: dict[int, TokenItem] = {}
        self.ready: collections.deque[TokenItem] = collections.deque()

    def restart(self, delivered: int) -> None:
        self.base = self.next = delivered
        self.pending.clear()
        self.ready.clear()

    async def get(self, queue: asyncio.Queue, deadline: float) -> TokenItem:
        """The next item in output order from ``queue``; ``asyncio.TimeoutError`` once the
        monotonic ``deadline`` passes."""
        while not self.ready:
            raw = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0.001))
            self.ready.extend(self.push(raw))
        return self.ready.popleft()

    def push(self, item: TokenItem) -> list[TokenItem]:
        offset = item.offset
        if offset is None or item.error is not None:
            return [item]
        pos = self.base + offset
        if pos > self.next:  # an earlier item is still on its way
            self.pending[pos] = item
            return []
        if pos < self.next:  # already delivered (should not happen): drop the overlap
            skip = self.next - pos
            item = item._replace(
                new_token_ids=item.new_token_ids[skip:],
                logprobs=item.logprobs[skip:] if item.logprobs else None,
                offset=offset + skip,
            )
        ready = [item]
        self.next += len(item.new_token_ids)
        while self.next in self.pending:
            nxt = self.pending.pop(self.next)
            ready.append(nxt)
            self.next += len(nxt.new_token_ids)
            if not nxt.new_token_ids:
                break  # a token-less item (finish) ends the chain
        return ready
