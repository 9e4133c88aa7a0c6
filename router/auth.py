"""HTTP authentication and per-key concurrency for the router (pure: aiohttp, no torch).

Who may call what (``AuthConfig``), decided by one aiohttp middleware (``auth_middleware``)
before any handler runs:

- ``/health``, ``/health/*`` and ``/openapi.json``: always open (probes; the API's shape
  is no secret).
- ``/metrics``: open, or only with ``Authorization: Bearer METRICS_KEY`` when a metrics key
  is set.
- ``/admin/*``: only with ``Authorization: Bearer ADMIN_KEY`` when an admin key is set;
  without one, served only when the router listens on loopback addresses only, and refused
  with 403 otherwise (an admin can drain and migrate every worker).
- everything else (``/v1/*``, ``/generate``, ``/tokenize``, ``/detokenize``, and any route
  added later: default deny): ``Authorization: Bearer API_KEY`` with one of the API keys
  when any is set; open when none is.

A missing or wrong key is 401 with OpenAI's error JSON (``code: "invalid_api_key"``) and a
``WWW-Authenticate: Bearer`` header. Keys are compared in constant time against every
configured key (no early exit that would tell which one nearly matched), and no key ever
reaches a log line, an error message or the start-up summary: a client is named by
``key_label`` (``key#1``...).

Per-key concurrency: with ``max_concurrent_per_key`` set, a key with that many requests in
flight on API routes gets 429 (OpenAI's error JSON, ``Retry-After: 1``) until one ends. A
request is in flight from the middleware's entry until its handler returns (a streamed
response returns once its last chunk is written), so a stream holds its slot to the end.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from collections import Counter
from dataclasses import dataclass

from aiohttp import web

from router.openai_api import ApiError

log = logging.getLogger("tandem.router.auth")

OPEN_PATHS = ("/health", "/openapi.json")  # and /health/*
# The label (key#N) of the API key that authenticated a request.
KEY_REQUEST: web.RequestKey[str] = web.RequestKey("tandem.api_key", str)


@dataclass(frozen=True)
class AuthConfig:
    """Keys and limits of the HTTP front end. Empty ``api_keys``: the API is open;
    ``admin_key`` None: /admin/* only on a loopback-only router; ``metrics_key`` None:
    /metrics open. ``loopback_only``: every address the router listens on is a loopback
    address (``listens_on_loopback``)."""

    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    metrics_key: str | None = None
    loopback_only: bool = True
    max_concurrent_per_key: int | None = None

    def __post_init__(self) -> None:
        for flag, key in [*(("--api-key", k) for k in self.api_keys),
                          ("--admin-key", self.admin_key), ("--metrics-key", self.metrics_key)]:  # fmt: skip
            if key is not None and not _valid_key(key):
                # The message names the flag, never the value.
                raise ValueError(
                    f"{flag}: a key must be 1-1024 printable ASCII characters without spaces "
                    "or commas"
                )
        if self.max_concurrent_per_key is not None:
            if self.max_concurrent_per_key < 1:
                raise ValueError("--max-concurrent-per-key must be >= 1")
            if not self.api_keys:
                raise ValueError(
                    "--max-concurrent-per-key counts requests per API key: give --api-key "
                    "(or TANDEM_API_KEY) too"
                )

    def __repr__(self) -> str:  # never print a key, even in a traceback's locals
        return (
            f"AuthConfig(api_keys=<{len(self.api_keys)}>, admin_key="
            f"{'<set>' if self.admin_key else None}, metrics_key="
            f"{'<set>' if self.metrics_key else None}, loopback_only={self.loopback_only}, "
            f"max_concurrent_per_key={self.max_concurrent_per_key})"
        )

    def describe(self) -> str:
        """One line for the start-up summary: what is protected by what (no key values)."""
        api = (
            f"{len(self.api_keys)} API key(s) (Bearer)"
            if self.api_keys
            else "API open (no --api-key)"
        )
        if self.admin_key:
            admin = "admin by --admin-key"
        elif self.loopback_only:
            admin = "admin open on loopback"
        else:
            admin = "admin refused (no --admin-key, not loopback)"
        metrics = "metrics by --metrics-key" if self.metrics_key else "metrics open"
        per_key = (
            f", {self.max_concurrent_per_key} concurrent per key"
            if self.max_concurrent_per_key
            else ""
        )
        return f"{api}{per_key}; {admin}; {metrics}"


def _valid_key(key: str) -> bool:
    return (
        0 < len(key) <= 1024
        and key.isascii()
        and key.isprintable()
        and not any(c in key for c in " ,")
    )


def listens_on_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address ("" and 0.0.0.0 are
    every interface: not loopback). An unresolvable host counts as not loopback."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _route_path(request: web.Request) -> str:
    """The path of the route that will serve ``request`` (its template, e.g.
    ``/admin/drain/{worker}``), so the rules see exactly what the router dispatches on;
    the raw path when no route matches (404/405: still behind the API key)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _bearer(request: web.Request) -> bytes | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def _matches(token: bytes | None, key: str) -> bool:
    # compare_digest's time depends on the lengths only, never on where the bytes differ.
    return token is not None and hmac.compare_digest(token, key.encode())


def _unauthorized(message: str) -> web.Response:
    body = ApiError(401, message).body()
    body["error"]["code"] = "invalid_api_key"
    return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})


def _refused(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(ApiError(status, message).body(), status=status, headers=headers)


class Auth:
    """The middleware's state: the config and the requests in flight per key label."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.in_flight: Counter[str] = Counter()

    def key_label(self, token: bytes | None) -> str | None:
        """``key#N`` (1-based) of the API key ``token`` is, or None. Every key is compared,
        whatever matched before."""
        found = None
        for i, key in enumerate(self.config.api_keys):
            if _matches(token, key) and found is None:
                found = f"key#{i + 1}"
        return found

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        path, c = _route_path(request), self.config
        if path in OPEN_PATHS or path.startswith("/health/"):
            return await handler(request)
        token = _bearer(request)
        if path == "/metrics":
            if c.metrics_key is not None and not _matches(token, c.metrics_key):
                return _unauthorized("/metrics needs 'Authorization: Bearer' with the metrics key")
            return await handler(request)
        if path == "/admin" or path.startswith("/admin/"):
            if c.admin_key is not None:
                if not _matches(token, c.admin_key):
                    log.warning("admin request refused from %s: bad or missing key", request.remote)
                    return _unauthorized(
                        "admin endpoints need 'Authorization: Bearer' with the admin key"
                    )
            elif not c.loopback_only:
                return _refused(
                    403,
                    "admin endpoints are off: this router listens beyond loopback and has no "
                    "admin key; start it with --admin-key (or TANDEM_ADMIN_KEY)",
                )
            return await handler(request)
        if not c.api_keys:
            return await handler(request)
        label = self.key_label(token)
        if label is None:
            what = "missing" if token is None else "invalid"
            return _unauthorized(
                f"{what} API key: send 'Authorization: Bearer YOUR_KEY' with a key this "
                "server accepts"
            )
        request[KEY_REQUEST] = label
        limit = c.max_concurrent_per_key
        if limit is not None and self.in_flight[label] >= limit:
            return _refused(
                429,
                f"too many concurrent requests for this API key (limit {limit}); retry later",
                {"Retry-After": "1"},
            )
        self.in_flight[label] += 1
        try:
            return await handler(request)
        finally:
            self.in_flight[label] -= 1
