"""Wire messages between router and workers: msgpack frames on persistent TCP (pure).

Frame: 4-byte big-endian length, then a msgpack map with a ``type`` key. Every message is
one frozen dataclass below; ``encode`` writes one, ``decode`` / ``read_message`` read one.

router → worker
  ``Submit``   request_id, prompt_token_ids, params (SamplingParams: max_tokens, ...),
               priority, decode_kv (disaggregated: the decode worker that takes it over)
  ``Abort``    request_ids
  ``Expect`` / ``Unexpect``   request_id (decode worker: its KV comes from elsewhere)
  ``Migrate``  request_id, dest_kv, final_blocks, max_stages, min_copy_stages, fault
worker → router
  ``Hello``    first frame: protocol ``version`` and what the worker is (role, model, KV
               size, ...). A router refuses a worker whose version differs from its own.
  ``Tokens``   items: one ``TokenItem`` per request with news, one frame per iteration
  ``Stats``    periodic load counters (running, waiting, kv_used, ...)
  ``Handoff``  request_id: its KV went to a decode worker, nothing more comes from here
  ``Migrated`` / ``MigrateFailed``   a migration's outcome, on the source's socket

Token frames are hot (one per iteration, every live stream): a ``TokenItem`` travels as a
msgpack array ``[request_id, new_token_ids, finish_reason, error, logprobs, offset,
error_kind]`` and is decoded into named fields.

A worker answers every accepted ``Submit`` with tokens until a finished item (a
``finish_reason``, or an ``error`` with its ``ErrorKind``), so nothing accepted is lost
silently. Frames larger than ``MAX_FRAME`` are refused.

The KV transfer backends (kvtransfer/) share the framing (``pack_frame``, ``read_frame``)
but have their own messages; a request's state as a handoff carries it is
``tandem.request_state``. This module is past 300 lines on purpose: it is the one table of
every router↔worker message, and splitting it would scatter that table.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import msgpack

from tandem.request import SamplingParams
from tandem.request_state import params_from_wire, params_to_wire

# Bumped on every incompatible change of a message. Peers without a version in their
# hello predate versioning: they count as version 1.
PROTOCOL_VERSION = 2
MAX_FRAME = 64 * 2**20
# Kept at the front of a worker-lost error's text, for people reading logs and responses;
# code reads ``ErrorKind``, never this text.
WORKER_LOST = "worker-lost:"
_HEADER = struct.Struct(">I")


class ProtocolError(RuntimeError):
    pass


class ProtocolVersionError(ProtocolError):
    def __init__(self, theirs: Any, ours: int = PROTOCOL_VERSION, peer: str = "peer") -> None:
        super().__init__(
            f"{peer} speaks tandem wire protocol v{theirs}, this side speaks v{ours}: "
            "run the same Tandem version on the router and its workers"
        )
        self.theirs, self.ours = theirs, ours


class BadMessage(ProtocolError):
    """A frame of a known type whose fields are wrong. ``request_id`` (when the frame had
    one) lets the receiver answer that request instead of dropping the connection."""

    def __init__(self, kind: str, request_id: Any, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.request_id = kind, request_id


class UnknownMessage(ProtocolError):
    def __init__(self, kind: Any) -> None:
        super().__init__(f"unknown message type {kind!r}")
        self.kind = kind


class ErrorKind(str, enum.Enum):
    """Why a request ended with an error; it alone chooses the HTTP status."""

    INVALID = "invalid"  # the worker refused the request (validation)
    WORKER_LOST = "worker_lost"  # the worker can no longer serve it: re-run elsewhere
    ENGINE = "engine"  # an engine iteration failed
    TIMEOUT = "timeout"  # the router gave up waiting

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def rerunnable(self) -> bool:
        return self is ErrorKind.WORKER_LOST


_HTTP_STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.WORKER_LOST: 502,
    ErrorKind.ENGINE: 500,
    ErrorKind.TIMEOUT: 504,
}


# ---------------------------------------------------------------------- token items
class TokenItem(NamedTuple):
    """News of one request in one iteration. ``offset``: output position of the first of
    ``new_token_ids`` (None on items that carry no tokens of an attempt: errors, aborts).
    An error item has both ``error`` (text) and ``error_kind``.

    A NamedTuple, not a dataclass, because token frames are the hot path: msgpack packs it
    as the array it already is, and decoding is one ``_make`` (a frozen dataclass costs
    about 4 us more per item each way: 4 ms per frame of 1,000 streams)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[Any] | None = None
    offset: int | None = None
    error_kind: ErrorKind | None = None
    # On the item with the first output token (offset 0), from the worker that ran the
    # prompt: its prompt tokens served from the prefix cache. None elsewhere.
    cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @classmethod
    def failed(cls, request_id: str, kind: ErrorKind, error: str) -> TokenItem:
        return cls(request_id, [], None, error, None, None, kind, None)

    @classmethod
    def lost(cls, request_id: str, why: str) -> TokenItem:
        return cls.failed(request_id, ErrorKind.WORKER_LOST, f"{WORKER_LOST} {why}")

    @classmethod
    def from_wire(cls, row: list[Any]) -> TokenItem:
        item = cls._make(row)  # TypeError unless 8 fields
        if item.error_kind is not None:
            item = item._replace(error_kind=ErrorKind(item.error_kind))
        return item


# ---------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Submit:
    TYPE: ClassVar[str] = "submit"
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    decode_kv: str | None = None  # disaggregated: KV address of the decode worker

    def to_wire(self) -> dict[str, Any]:
        d = {"type": self.TYPE, "request_id": self.request_id,
             "prompt_token_ids": list(self.prompt_token_ids),
             "params": params_to_wire(self.params), "priority": self.priority}  # fmt: skip
        if self.decode_kv is not None:
            d["decode_kv"] = self.decode_kv
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Submit:
        return cls(
            request_id=d["request_id"],
            prompt_token_ids=list(d["prompt_token_ids"]),
            params=params_from_wire(d["params"]),
            priority=int(d.get("priority", 0)),
            decode_kv=None if d.get("decode_kv") is None else str(d["decode_kv"]),
        )


@dataclass(frozen=True)
class Abort:
    TYPE: ClassVar[str] = "abort"
    request_ids: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "request_ids": list(self.request_ids)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Abort:
        return cls(tuple(d["request_ids"]))


@dataclass(frozen=True)
class Expect:
    TYPE: ClassVar[str] = "expect"
    request_id: str


@dataclass(frozen=True)
class Unexpect:
    TYPE: ClassVar[str] = "unexpect"
    request_id: str


@dataclass(frozen=True)
class Handoff:
    TYPE: ClassVar[str] = "handoff"
    request_id: str


@dataclass(frozen=True)
class Migrate:
    TYPE: ClassVar[str] = "migrate"
    request_id: str
    dest_kv: str
    final_blocks: int = 2
    max_stages: int = 8
    min_copy_stages: int = 0
    fault: str | None = None  # injected fault (tests; TANDEM_MIGRATION_FAULTS)


@dataclass(frozen=True)
class Migrated:
    TYPE: ClassVar[str] = "migrated"
    request_id: str
    blocks: int
    stages: int
    seconds: float
    downtime_s: float


@dataclass(frozen=True)
class MigrateFailed:
    TYPE: ClassVar[str] = "migrate_failed"
    request_id: str
    error: str
    maybe_committed: bool = False


@dataclass(frozen=True)
class Tokens:
    TYPE: ClassVar[str] = "tokens"
    items: tuple[TokenItem, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "items": self.items}  # each item packs as an array

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Tokens:
        new, item_cls, slow = tuple.__new__, TokenItem, TokenItem.from_wire
        items = []
        for row in d["items"]:
            item = new(item_cls, row)  # the hot path: 8 fields, no error kind to convert
            if len(item) != 8 or item[6] is not None:
                item = slow(row)  # checks the length, makes the ErrorKind
            items.append(item)
        return cls(tuple(items))


@dataclass(frozen=True)
class Stats:
    """Load counters by name (running, waiting, kv_used, ...; each role adds its own).
    On the wire they sit flat beside ``type``."""

    TYPE: ClassVar[str] = "stats"
    values: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, **self.values}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Stats:
        return cls({k: v for k, v in d.items() if k != "type"})


@dataclass(frozen=True)
class Hello:
    """A worker's first frame. The router's dispatch, admission, migration and start-up
    summaries read these fields."""

    TYPE: ClassVar[str] = "hello"
    role: str
    model: str
    compat: str
    kv_blocks: int
    max_num_seqs: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    cache_salt: Any = None  # what a router needs to name a prompt's blocks as this cache does
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    host_kv_blocks: int = 0
    policy: str = "fcfs"
    max_num_batched_tokens: int = 0
    chunked_prefill: bool = True
    worker_id: str = ""
    kv_address: str | None = None  # decode role: where its KV receiver listens
    migration: bool = False  # decode role: it can migrate requests out
    challenge: bytes | None = None  # with a cluster secret: the nonce to prove (tandem.auth)
    version: int = PROTOCOL_VERSION

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, for readers that take a mapping (summaries, metrics)."""
        return {"type": self.TYPE, **asdict(self)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Hello:
        version = d.get("version", 1)
        if version != PROTOCOL_VERSION:  # before anything else: its fields may differ
            raise ProtocolVersionError(version)
        return cls(**_known_fields(cls, d, strict=False))


Message = (
    Submit
    | Abort
    | Expect
    | Unexpect
    | Handoff
    | Migrate
    | Migrated
    | MigrateFailed
    | Tokens
    | Stats
    | Hello
)
_TYPES: dict[str, type] = {cls.TYPE: cls for cls in typing.get_args(Message)}


def _known_fields(cls: type, d: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    extra = set(d) - names - {"type"}
    if extra and strict:
        raise ValueError(f"unknown fields {sorted(extra)}")
    return {k: v for k, v in d.items() if k in names}


# ---------------------------------------------------------------------- encode / decode
def encode(msg: Message) -> bytes:
    """One message as a length-prefixed frame."""
    to_wire = getattr(msg, "to_wire", None)
    d = to_wire() if to_wire is not None else {"type": msg.TYPE, **asdict(msg)}
    return pack_frame(d)


def decode(d: dict[str, Any]) -> Message:
    """A frame's map as its message. ``UnknownMessage`` for a type not listed here,
    ``BadMessage`` for wrong fields, ``ProtocolVersionError`` for another version's hello."""
    kind = d.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownMessage(kind)
    try:
        from_wire = getattr(cls, "from_wire", None)
        return from_wire(d) if from_wire is not None else cls(**_known_fields(cls, d))
    except ProtocolVersionError:
        raise
    except (KeyError, TypeError, ValueError, ProtocolError) as e:
        reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise BadMessage(kind, d.get("request_id"), reason) from None


async def read_message(reader: asyncio.StreamReader) -> Message:
    """Next message; raises ``asyncio.IncompleteReadError`` at a clean end of stream."""
    return decode(await read_frame(reader))


def pack_frame(d: dict[str, Any]) -> bytes:
    body = msgpack.packb(d, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Next frame's map; raises ``asyncio.IncompleteReadError`` at a clean end of stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ProtocolError(f"peer sent a frame of {size} bytes (limit {MAX_FRAME})")
    msg = msgpack.unpackb(await reader.readexactly(size), raw=False, strict_map_key=False)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError("malformed frame: not a map with a 'type'")
    return msg
