"""Cluster secret: mutual HMAC challenge-response on the worker control connection (pure).

Every service of one deployment (router, prefill and decode workers) may share a secret
(``TANDEM_CLUSTER_SECRET``, or ``--cluster-secret-file FILE``; at least 16 bytes). With
one, a worker's control port serves only peers that prove they know it:

1. worker -> peer: its ``hello`` frame carries ``challenge`` (32 random bytes, fresh per
   connection).
2. peer -> worker: ``{"type": "auth", "nonce": N, "mac": HMAC(secret, CLIENT | challenge | N)}``
   (N: 32 random bytes of the peer's).
3. worker -> peer: ``{"type": "auth_ok", "mac": HMAC(secret, WORKER | challenge | N)}`` and
   the connection goes on as usual; or ``{"type": "auth_failed", "reason": ...}`` and it is
   closed, with the reason logged (the peer's address, never the secret or a MAC).

The peer checks the worker's MAC too, so neither side talks to an impostor; the nonces make
every exchange unique (no replay). HMAC-SHA256, compared with ``hmac.compare_digest``.
A router with a secret refuses a worker whose hello has no challenge, and a router
without one is told the worker wants it: a half-configured cluster fails loudly.

What this does not cover (README, Security): the frames after the handshake are neither
encrypted nor MAC'd (use a private network or TLS tunnel between hosts), and the KV
transfer port (``kvtransfer``) is not authenticated yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from pathlib import Path
from typing import Any

from tandem import env, protocol

log = logging.getLogger("tandem.auth")

MIN_SECRET_BYTES = 16
NONCE_BYTES = 32
HANDSHAKE_TIMEOUT_S = 10.0
_CLIENT = b"tandem-cluster-v1 client"
_WORKER = b"tandem-cluster-v1 worker"


class ClusterAuthError(protocol.ProtocolError):
    """The other side failed (or refused) the cluster-secret handshake."""


def load_secret(file: str | None) -> bytes | None:
    """The cluster secret: ``file``'s content (stripped) if given, else
    ``TANDEM_CLUSTER_SECRET``; None when neither is set. ValueError (naming the source,
    never the value) when it is shorter than ``MIN_SECRET_BYTES`` or the file is unreadable."""
    if file is not None:
        try:
            secret = Path(file).read_bytes().strip()
        except OSError as e:
            raise ValueError(f"--cluster-secret-file: {e.strerror}: {file}") from None
        source = f"--cluster-secret-file {file}"
    else:
        text = env.cluster_secret()
        if text is None:
            return None
        secret, source = text.encode(), "TANDEM_CLUSTER_SECRET"
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{source}: the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _mac(secret: bytes, side: bytes, challenge: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, side + challenge + nonce, hashlib.sha256).digest()


def new_challenge() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    challenge: bytes,
    peer: str,
) -> bool:
    """Worker side, after its hello (with ``challenge``) is written: read the peer's proof,
    answer ``auth_ok`` or ``auth_failed``. True when the peer is authenticated; False (the
    reason logged, the caller closes the connection) otherwise."""
    try:
        msg = await asyncio.wait_for(protocol.read_frame(reader), HANDSHAKE_TIMEOUT_S)
    except asyncio.TimeoutError:
        reason = f"no auth frame within {HANDSHAKE_TIMEOUT_S:g} s"
        msg = None
    except (asyncio.IncompleteReadError, ConnectionError):
        # A TCP probe (the container healthcheck) does just this: not worth a warning.
        log.info("refused %s: it closed before authenticating", peer)
        return False
    except protocol.ProtocolError as e:
        reason, msg = f"bad frame ({e})", None
    if msg is not None:
        nonce, mac = msg.get("nonce"), msg.get("mac")
        if msg.get("type") != "auth":
            reason = f"expected an auth frame, got {str(msg.get('type'))[:32]!r}"
        elif (
            not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES or not isinstance(mac, bytes)
        ):
            reason = "malformed auth frame"
        elif not hmac.compare_digest(mac, _mac(secret, _CLIENT, challenge, nonce)):
            reason = "wrong cluster secret"
        else:
            writer.write(
                protocol.pack_frame(
                    {"type": "auth_ok", "mac": _mac(secret, _WORKER, challenge, nonce)}
                )
            )
            return True
    log.warning("refused %s: %s", peer, reason)
    writer.write(protocol.pack_frame({"type": "auth_failed", "reason": reason}))
    return False


async def answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes | None,
    hello: dict[str, Any],
    worker: str,
) -> None:
    """Peer side, after reading ``worker``'s hello: prove the secret and check the worker's
    proof. Raises ``ClusterAuthError`` saying what is wrong (mismatched configuration, a
    wrong secret on either side). With no secret and no challenge: nothing to do."""
    challenge = hello.get("challenge")
    if secret is None:
        if challenge is not None:
            raise ClusterAuthError(
                f"worker {worker} requires the cluster secret (set TANDEM_CLUSTER_SECRET or "
                "--cluster-secret-file)"
            )
        return
    if not isinstance(challenge, bytes) or len(challenge) != NONCE_BYTES:
        raise ClusterAuthError(
            f"worker {worker} has no cluster secret (its hello carries no challenge); refusing it"
        )
    nonce = secrets.token_bytes(NONCE_BYTES)
    writer.write(
        protocol.pack_frame(
            {"type": "auth", "nonce": nonce, "mac": _mac(secret, _CLIENT, challenge, nonce)}
        )
    )
    reply = await asyncio.wait_for(protocol.read_frame(reader), HANDSHAKE_TIMEOUT_S)
    if reply.get("type") == "auth_failed":
        raise ClusterAuthError(f"worker {worker} refused us: {str(reply.get('reason'))[:200]}")
    mac = reply.get("mac")
    if (
        reply.get("type") != "auth_ok"
        or not isinstance(mac, bytes)
        or not hmac.compare_digest(mac, _mac(secret, _WORKER, challenge, nonce))
    ):
        raise ClusterAuthError(f"worker {worker} did not prove the cluster secret")
