"""Wire messages: every message survives encode/decode, a peer of another protocol version
is refused naming both versions, and an error's kind alone chooses its HTTP status (pure)."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from router.workers import WorkerClient
from tandem import protocol
from tandem.protocol import (
    PROTOCOL_VERSION,
    Abort,
    ErrorKind,
    Expect,
    Handoff,
    Hello,
    Migrate,
    Migrated,
    MigrateFailed,
    Stats,
    Submit,
    TokenItem,
    Tokens,
    Unexpect,
)
from tandem.request import SamplingParams

HELLO = Hello(role="decode", model="m", compat="abc", kv_blocks=64, max_num_seqs=8,
              max_model_len=128, vocab_size=100, eos_token_ids=[2], block_size=16,
              kv_address="127.0.0.1:9", migration=True, worker_id="decode-1")  # fmt: skip

MESSAGES = [
    Submit("r1", [1, 2, 3], SamplingParams(max_tokens=7, stop=("x",), seed=3), priority=2),
    Submit("r2", [4], SamplingParams(), priority=0, decode_kv="10.0.0.1:7000"),
    Abort(("r1", "r2")),
    Expect("r1"),
    Unexpect("r1"),
    Handoff("r1"),
    Migrate("r1", "127.0.0.1:9", final_blocks=2, max_stages=8, min_copy_stages=1, fault=None),
    Migrated("r1", blocks=5, stages=2, seconds=0.25, downtime_s=0.01),
    MigrateFailed("r1", "refused", maybe_committed=True),
    Tokens(
        (
            TokenItem("r1", [5, 6], None, None, [[-0.1, [[5, -0.1]]], [-0.2, []]], 3),
            TokenItem("r2", [], "length", None, None, 9),
            TokenItem.failed("r3", ErrorKind.INVALID, "prompt too long"),
            TokenItem.lost("r4", "worker w disconnected"),
        )
    ),  # fmt: skip
    Stats({"running": 3, "waiting": 1, "kv_used": 40, "prefix_summary": [b"\x01\x02"]}),
    HELLO,
]


def _body(frame: bytes) -> dict:
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    return msgpack.unpackb(frame[4:], raw=False, strict_map_key=False)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    frame = protocol.encode(msg)
    body = _body(frame)
    assert body["type"] == msg.TYPE
    assert protocol.decode(body) == msg


def test_every_message_type_is_covered():
    assert {m.TYPE for m in MESSAGES} == set(protocol._TYPES)


def test_round_trip_through_a_stream():
    async def scenario() -> list:
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(protocol.encode(m) for m in MESSAGES))
        reader.feed_eof()
        return [await protocol.read_message(reader) for _ in MESSAGES]

    assert asyncio.run(scenario()) == MESSAGES


def test_token_items_are_compact_arrays_with_named_fields():
    ok = TokenItem("r", [1], None, None, None, 0)
    err = TokenItem.failed("r", ErrorKind.ENGINE, "engine error: boom")
    rows = _body(protocol.encode(Tokens((ok, err))))["items"]
    assert rows == [
        ["r", [1], None, None, None, 0, None, None],
        ["r", [], None, "engine error: boom", None, None, "engine", None],
    ]
    assert not ok.finished and err.finished and TokenItem("r", [], "stop").finished


def test_priority_and_max_tokens_travel_by_name():
    msg = protocol.decode(_body(protocol.encode(
        Submit("r", [1], SamplingParams(max_tokens=33), priority=4))))  # fmt: skip
    assert isinstance(msg, Submit)
    assert msg.priority == 4 and msg.params.max_tokens == 33


def test_bad_fields_name_the_request():
    with pytest.raises(protocol.BadMessage) as e:
        protocol.decode({"type": "submit", "request_id": "r9", "params": {}})
    assert e.value.kind == "submit" and e.value.request_id == "r9"
    with pytest.raises(protocol.BadMessage):
        protocol.decode({"type": "submit", "request_id": "r9", "prompt_token_ids": [1],
                         "params": {"no_such_field": 1}})  # fmt: skip
    with pytest.raises(protocol.BadMessage):
        protocol.decode({"type": "expect", "request_id": "r", "surprise": 1})
    with pytest.raises(protocol.BadMessage):
        protocol.decode({"type": "tokens", "items": [["r", [], None]]})
    with pytest.raises(protocol.UnknownMessage):
        protocol.decode({"type": "no-such-type"})


def test_a_hello_of_another_version_is_refused_naming_both():
    wire = {**_body(protocol.encode(HELLO)), "version": PROTOCOL_VERSION + 1}
    with pytest.raises(protocol.ProtocolVersionError) as e:
        protocol.decode(wire)
    text = str(e.value)
    assert f"v{PROTOCOL_VERSION + 1}" in text and f"v{PROTOCOL_VERSION}" in text
    old = {k: v for k, v in wire.items() if k != "version"}  # before versioning: v1
    with pytest.raises(protocol.ProtocolVersionError, match="v1"):
        protocol.decode(old)


def test_router_refuses_a_worker_of_another_version():
    async def scenario() -> None:
        async def handle(reader, writer) -> None:
            body = {**HELLO.as_dict(), "version": 1}
            writer.write(protocol.pack_frame(body))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = WorkerClient(address)
        with pytest.raises(protocol.ProtocolVersionError) as e:
            await client.connect(timeout=5)
        assert address in str(e.value) and "v1" in str(e.value)
        assert f"v{PROTOCOL_VERSION}" in str(e.value)
        assert not client.connected
        server.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (ErrorKind.INVALID, 400),
        (ErrorKind.WORKER_LOST, 502),
        (ErrorKind.ENGINE, 500),
        (ErrorKind.TIMEOUT, 504),
    ],  # fmt: skip
)
def test_error_kind_chooses_the_http_status(kind, status):
    assert kind.http_status == status
    assert kind.rerunnable is (kind is ErrorKind.WORKER_LOST)


def test_every_error_kind_has_a_status():
    assert all(isinstance(k.http_status, int) for k in ErrorKind)
