"""Cluster-secret handshake (tandem.auth) over real loopback sockets: both sides prove the
secret, a wrong or missing one on either side is refused with a reason, replayed or forged
proofs fail, and no secret leaks into an error."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tandem import auth, protocol

SECRET, OTHER = b"s" * 32, b"o" * 32


async def _pair(worker_secret, peer_secret, forge=None):
    """A worker that says hello (+ challenge) and runs ``accept``, then sends one more frame;
    a peer that runs ``answer``. Returns (peer outcome, worker accepted)."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        challenge = auth.new_challenge() if worker_secret is not None else None
        hello = protocol.Hello(
            role="colocated", model="m", compat="c", kv_blocks=1, max_num_seqs=1,
            max_model_len=16, vocab_size=16, challenge=challenge,
        )  # fmt: skip
        writer.write(protocol.encode(hello))
        ok = True
        if forge is not None:
            await protocol.read_frame(reader)
            writer.write(protocol.pack_frame(forge))
            await writer.drain()
        elif worker_secret is not None:
            ok = await auth.accept(reader, writer, worker_secret, challenge, "peer")
        accepted.set_result(ok)
        if ok:
            writer.write(protocol.pack_frame({"type": "stats", "up": 1}))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        hello = await protocol.read_frame(reader)
        try:
            await auth.answer(reader, writer, peer_secret, hello, f"127.0.0.1:{port}")
            outcome = (await protocol.read_frame(reader))["type"]
        except auth.ClusterAuthError as e:
            outcome = str(e)
        writer.close()  # a worker still waiting for a proof sees the peer go
        return outcome, await asyncio.wait_for(accepted, 5)
    finally:
        writer.close()
        server.close()


def test_same_secret_on_both_sides_connects():
    assert asyncio.run(_pair(SECRET, SECRET)) == ("stats", True)


def test_no_secret_anywhere_connects_as_before():
    assert asyncio.run(_pair(None, None))[0] == "stats"


def test_wrong_secret_is_refused_by_the_worker_with_a_logged_reason(caplog):
    caplog.set_level(logging.WARNING, "tandem.auth")
    outcome, accepted = asyncio.run(_pair(SECRET, OTHER))
    assert "refused us: wrong cluster secret" in outcome and accepted is False
    assert "refused peer: wrong cluster secret" in caplog.text
    assert SECRET.decode() not in outcome + caplog.text and OTHER.decode() not in outcome


def test_peer_without_secret_is_told_the_worker_wants_one():
    outcome, _ = asyncio.run(_pair(SECRET, None))
    assert "requires the cluster secret" in outcome


def test_peer_with_secret_refuses_a_worker_without_one():
    outcome, _ = asyncio.run(_pair(None, SECRET))
    assert "has no cluster secret" in outcome


@pytest.mark.parametrize("reply", [{"type": "auth_ok", "mac": b"x" * 32}, {"type": "auth_ok"},
                                   {"type": "stats"}])  # fmt: skip
def test_an_impostor_worker_that_cannot_prove_the_secret_is_refused(reply):
    outcome, _ = asyncio.run(_pair(SECRET, SECRET, forge=reply))
    assert "did not prove the cluster secret" in outcome


def test_a_replayed_proof_fails_against_a_fresh_challenge():
    async def main():
        challenge1, challenge2, nonce = auth.new_challenge(), auth.new_challenge(), b"n" * 32
        proof = auth._mac(SECRET, auth._CLIENT, challenge1, nonce)

        async def handle(reader, writer):
            result.set_result(await auth.accept(reader, writer, SECRET, challenge2, "replayer"))
            writer.close()

        result = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(protocol.pack_frame({"type": "auth", "nonce": nonce, "mac": proof}))
        ok = await asyncio.wait_for(result, 5)
        writer.close()
        server.close()
        return ok

    assert asyncio.run(main()) is False


@pytest.mark.parametrize("frame", [b"\x00\x00\x00\x02\x91\x01", b""])
def test_garbage_or_silence_is_refused(frame, monkeypatch):
    monkeypatch.setattr(auth, "HANDSHAKE_TIMEOUT_S", 0.3)

    async def main():
        result = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            result.set_result(await auth.accept(reader, writer, SECRET, auth.new_challenge(), "x"))
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(frame)
        ok = await asyncio.wait_for(result, 5)
        writer.close()
        server.close()
        return ok

    assert asyncio.run(main()) is False


def test_load_secret_from_env_and_file(monkeypatch, tmp_path):
    monkeypatch.delenv("TANDEM_CLUSTER_SECRET", raising=False)
    assert auth.load_secret(None) is None
    monkeypatch.setenv("TANDEM_CLUSTER_SECRET", "e" * 20)
    assert auth.load_secret(None) == b"e" * 20
    f = tmp_path / "secret"
    f.write_bytes(b"f" * 24 + b"\n")
    assert auth.load_secret(str(f)) == b"f" * 24  # the file wins over the environment
    monkeypatch.setenv("TANDEM_CLUSTER_SECRET", "short-one")
    with pytest.raises(ValueError, match="at least 16 bytes") as info:
        auth.load_secret(None)
    assert "short-one" not in str(info.value)
    with pytest.raises(ValueError, match="--cluster-secret-file"):
        auth.load_secret(str(tmp_path / "missing"))


def test_auth_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, tandem.auth, router.auth, router.openapi; "
            "assert 'torch' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
