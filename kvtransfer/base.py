"""Contracts of a KV transfer: move one request's state and K/V bytes to another engine.

A transfer moves ONE request: a ``KVBundle`` (its state, a msgpack-able dict, plus its
payload tensor [layers, 2, n_blocks, block_size, Hkv, D] in float32, float16 or bfloat16).
It is two-sided (DESIGN, "KV handoff")::

    sender (source engine)                       receiver (destination engine)
    exp = kv.export(rid, n); payload = gather
    send(dest, bundle) ── OFFER ───────────────► check compat hash, duplicate id, sizes
                                                 block_ids = reserve(rid, num_tokens)
                       ◄──────── ACCEPT | REFUSE  (lease starts: lease_s)
                       ── state, payload ──────► (chunked stream)
                                                 commit(rid, block_ids, payload, state)
                       ◄──────────────── DONE    (or FAILED: commit raised, reservation aborted)
    returns: kv.release_export(exp)
    raises TransferError: kv.restore_export(exp)

Guarantees:
- ``KVSender.send`` returns only after the receiver committed (DONE); then, and only then,
  the caller may free its blocks. Any failure raises ``TransferError`` (``TransferRefused``
  when the receiver said no before anything was reserved, ``TransferTimeout`` when DONE did
  not arrive within ``timeout_s``); the caller keeps or restores its blocks.
- The receiver calls ``abort(rid, block_ids)`` exactly once for every reservation that it
  does not commit: commit raised, the payload did not complete within ``lease_s`` (the
  sender stalled or died), the connection dropped mid-payload, or the receiver closed.
  ``commit`` is called at most once per reservation, and never after ``abort``.
- One receiver serves many transfers at once; an id already in flight is refused.
- The one window no two-sided protocol closes: if DONE is lost after the receiver
  committed, the sender's error has ``maybe_committed=True``. The caller then restores its
  blocks (the request is never lost) and must abort the request at the destination.

Receiver callbacks (``ReceiverCallbacks``; each may be a plain or an async function):
- ``reserve(request_id, num_tokens) -> block_ids``: ``ceil(num_tokens / block_size)`` ids,
  all or nothing. ``NoFreeBlocksError`` becomes REFUSE "no free blocks"; any other error
  becomes REFUSE with its message.
- optional ``reserve_cached(request_id, num_tokens, block_names) -> (skip, block_ids)``:
  used instead of ``reserve`` when the offer names its leading full blocks (prefix
  caching): the receiver already holds the first ``skip`` of them and reserves ids only
  for the blocks after them. ACCEPT carries ``skip``; the sender sends the payload
  without those blocks, and ``commit`` gets the ids and the payload of the rest.
- ``commit(request_id, block_ids, payload, state)``: write the payload into the blocks and
  adopt the request. All or nothing: if it raises, the reservation must still be pending.
- ``abort(request_id, block_ids)``: free the reservation. Should not raise.

Backends (``kvtransfer.BACKENDS``): ``local`` (same process, objects handed over) and
``tcp`` (asyncio streams). Both drive the same receiver state machine
(``kvtransfer.inbound``), so leases, duplicate checks, callbacks and metrics behave
identically.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from kvtransfer import wire
from kvtransfer.wire import Offer


class TransferState(enum.Enum):
    OFFERED = "offered"  # offer made; receiver is checking it and reserving blocks
    STREAMING = "streaming"  # accepted; bytes moving (receiver holds blocks under a lease)
    COMMITTING = "committing"  # all bytes sent / arrived; receiver commits, sender awaits DONE
    DONE = "done"
    FAILED = "failed"


class RefuseReason(enum.Enum):
    INCOMPATIBLE = "incompatible"  # compat hashes differ
    NO_FREE_BLOCKS = "no_free_blocks"
    DUPLICATE = "duplicate"  # a transfer of this request id is already in flight
    BAD_OFFER = "bad_offer"  # sizes, dtype or shape inconsistent
    RESERVE_FAILED = "reserve_failed"  # reserve raised something else
    CLOSED = "closed"  # the receiver is shutting down


class TransferError(RuntimeError):
    """A transfer did not complete; the sender still owns the request.

    ``maybe_committed`` is true only when the failure came after the last byte was sent
    and before DONE arrived: the receiver may have committed (see the module docstring).
    """

    def __init__(self, request_id: str, message: str, maybe_committed: bool = False) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.maybe_committed = maybe_committed


class TransferRefused(TransferError):
    """The receiver said no at the handshake; nothing was reserved there."""

    def __init__(self, request_id: str, reason: RefuseReason, message: str) -> None:
        super().__init__(request_id, message)
        self.reason = reason


class TransferTimeout(TransferError):
    """DONE did not arrive within the sender's ``timeout_s``."""


@dataclass(frozen=True)
class KVBundle:
    """What one transfer moves. ``payload`` holds K/V for the first ``num_tokens`` tokens:
    [layers, 2, ceil(num_tokens / block_size), block_size, Hkv, D]. ``state`` is opaque here
    (request_id, prompt_token_ids, output_token_ids, params, num_computed_tokens, priority,
    policy_state, ...) but must be msgpack-able."""

    request_id: str
    num_tokens: int
    payload: torch.Tensor
    state: dict[str, Any] = field(default_factory=dict)
    # Prefix-cache names of the payload's leading full blocks (optional: see Offer).
    block_names: tuple[bytes, ...] = ()


@dataclass
class TransferMetrics:
    """Counters of one end. ``bytes`` and ``seconds`` count successful transfers only
    (state + payload bytes; wall time from offer to DONE)."""

    ok: int = 0
    failed: int = 0  # every transfer that did not complete, refusals included
    refused: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped_blocks: int = 0  # blocks not moved: the receiver held them (prefix cache)

    def record_ok(self, nbytes: int, seconds: float) -> None:
        self.ok += 1
        self.bytes += nbytes
        self.seconds += seconds

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class ReceiverCallbacks(Protocol):
    """The destination engine's side of a transfer (see the module docstring)."""

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | Awaitable[list[int]]: ...

    def commit(
        self, request_id: str, block_ids: list[int], payload: torch.Tensor, state: dict[str, Any]
    ) -> None | Awaitable[None]: ...

    def abort(self, request_id: str, block_ids: list[int]) -> None | Awaitable[None]: ...


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a plain or async callback."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


@dataclass
class Progress:
    """Where one outgoing transfer stands (the sender's state, polled on failure)."""

    state: TransferState = TransferState.OFFERED
    skip: int = 0  # leading blocks the receiver holds already (not sent)


class KVSender(abc.ABC):
    """Source end. ``send`` runs one transfer; many may run at once (distinct ids)."""

    name = "abstract"

    def __init__(self, compat_hash: str, timeout_s: float = 30.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.compat_hash = compat_hash
        self.timeout_s = timeout_s
        self.metrics = TransferMetrics()
        self._in_flight: set[str] = set()

    async def send(self, dest: str, bundle: KVBundle, timeout_s: float | None = None) -> None:
        """Move ``bundle`` to the receiver at ``dest``; return once it has committed.

        ``ValueError`` for a malformed bundle (nothing is sent); ``TransferError`` (or a
        subclass) for every failure of the transfer itself.
        """
        state_bytes = wire.pack_state(bundle.state)
        offer = Offer.for_payload(
            bundle.request_id, bundle.num_tokens, bundle.payload, self.compat_hash,
            len(state_bytes), bundle.block_names,
        )  # fmt: skip
        rid = offer.request_id
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if rid in self._in_flight:
            self.metrics.failed += 1
            self.metrics.refused += 1
            raise TransferRefused(
                rid, RefuseReason.DUPLICATE, f"{rid!r} is already being sent by this sender"
            )
        self._in_flight.add(rid)
        progress = Progress()
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(
                self._transfer(dest, offer, state_bytes, bundle.payload, progress), timeout
            )
        except asyncio.TimeoutError:
            self.metrics.failed += 1
            raise TransferTimeout(
                rid,
                f"transfer of {rid!r} to {dest}: no DONE within {timeout}s "
                f"(stopped while {progress.state.value})",
                maybe_committed=progress.state is TransferState.COMMITTING,
            ) from None
        except TransferError as e:
            self.metrics.failed += 1
            self.metrics.refused += isinstance(e, TransferRefused)
            raise
        except Exception as e:  # connection errors, protocol violations
            self.metrics.failed += 1
            raise TransferError(
                rid,
                f"transfer of {rid!r} to {dest} failed while {progress.state.value}: {e!r}",
                maybe_committed=progress.state is TransferState.COMMITTING,
            ) from e
        finally:
            self._in_flight.discard(rid)
        sent = offer.skip(progress.skip)
        self.metrics.skipped_blocks += progress.skip
        self.metrics.record_ok(sent.state_nbytes + sent.payload_nbytes, time.monotonic() - t0)

    @abc.abstractmethod
    async def _transfer(
        self,
        dest: str,
        offer: Offer,
        state_bytes: bytes,
        payload: torch.Tensor,
        progress: Progress,
    ) -> None:
        """Run the handshake and move the bytes; return on DONE. Raise ``TransferError``
        for an answer from the receiver; anything else is wrapped by ``send``. Keep
        ``progress.state`` current, and set ``progress.skip`` to the ACCEPT's skip (then
        move ``offer.skip(skip)`` and ``payload[:, :, skip:]``). Must clean up (close a
        connection) if cancelled."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections; the sender must not be used afterwards."""


class KVReceiver(abc.ABC):
    """Destination end: answers offers through ``callbacks`` (``ReceiverCallbacks``).

    Every backend drives one ``kvtransfer.inbound.InboundTransfers``, the state machine
    that holds each reservation and its lease and makes every ``abort`` call, so leases,
    duplicate checks and metrics behave the same whatever moves the bytes.
    """

    name = "abstract"
    metrics: TransferMetrics

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """What a sender passes as ``dest`` to reach this receiver."""

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Begin accepting offers."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Refuse new offers and abort every reservation whose payload has not arrived."""

    @abc.abstractmethod
    def transfers(self) -> dict[str, TransferState]:
        """Transfers in flight here and their state."""
