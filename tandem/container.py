"""Entrypoint and healthcheck of the Docker images (``docker/Dockerfile.cpu``, ``.cuda``).

Lifecycle of a container:

1. ``python -m tandem.container run ROLE [FLAGS...]`` is the image's ENTRYPOINT. For the
   service roles (router, prefill-worker, decode-worker, serve) it turns the ``TANDEM_*``
   settings that ``tandem.env.container_settings`` reads into flags, placed *before* the
   container's own flags so that a flag on the command line wins (argparse keeps the last).
   Any other ROLE (``make-tiny-model``, ``loadgen``, ...) is passed to ``tandem`` untouched.
2. A worker gets a worker id here when none is given: replicas of one compose service share
   the host's name under host networking, so the id is random, and it is written down so
   the healthcheck can look for it in the registry.
3. The final argv is saved to the state file, then this process becomes ``tandem`` (exec),
   so signals from ``docker stop`` reach the service directly.
4. ``python -m tandem.container health`` is the image's HEALTHCHECK. It re-parses the saved
   argv with the real CLI parser, so it probes exactly what the service was told to serve:
   the router's ``GET /health`` (200 and at least ``TANDEM_HEALTH_MIN_WORKERS`` workers), or
   a worker's registry entry plus a TCP connect to the address the entry advertises.

This module reads no environment itself; ``tandem.env`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

SERVICE_ROLES = ("router", "prefill-worker", "decode-worker", "serve")
WORKER_ROLES = ("prefill-worker", "decode-worker")

# TANDEM_* setting -> (flag, roles that take it). Everything else goes in TANDEM_ARGS.
_ENV_FLAGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("TANDEM_MODEL", "--model", SERVICE_ROLES),
    ("TANDEM_REGISTRY", "--registry", ("router", *WORKER_ROLES)),
    ("TANDEM_HOST", "--host", SERVICE_ROLES),
    ("TANDEM_PORT", "--port", SERVICE_ROLES),
    ("TANDEM_DEVICE", "--device", (*WORKER_ROLES, "serve")),
    ("TANDEM_DTYPE", "--dtype", (*WORKER_ROLES, "serve")),
    ("TANDEM_ADVERTISE_HOST", "--advertise-host", WORKER_ROLES),
    ("TANDEM_WORKER_ID", "--worker-id", WORKER_ROLES),
)


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def service_argv(role: str, argv: Sequence[str], settings: Mapping[str, str]) -> list[str]:
    """The ``tandem`` argv for ``role``: flags from ``settings`` (TANDEM_*), then
    ``TANDEM_ARGS`` split like a shell would, then ``argv`` (so explicit flags win)."""
    if role not in SERVICE_ROLES:
        return [role, *argv]
    from_env: list[str] = []
    for name, flag, roles in _ENV_FLAGS:
        value = settings.get(name, "")
        if value and role in roles:
            from_env += [flag, value]
    extra = shlex.split(settings.get("TANDEM_ARGS", ""))
    out = [role, *from_env, *extra, *argv]
    if role in WORKER_ROLES and not _has_flag(out, "--worker-id"):
        out += ["--worker-id", f"{role.removesuffix('-worker')}-{uuid.uuid4().hex[:12]}"]
    return out


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    from tandem.cli import build_parser

    return build_parser().parse_args(list(argv))


def _dial_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _tcp_ok(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((_dial_host(host.strip("[]")), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def check_router(args: argparse.Namespace, min_workers: int, timeout: float) -> tuple[bool, str]:
    url = f"http://{_dial_host(args.host)}:{args.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"
    workers = int(body.get("workers", 0))
    if workers < min_workers:
        return False, f"{url}: {workers} workers, want at least {min_workers}"
    return True, f"{url}: ok, {workers} workers"


def check_worker(args: argparse.Namespace, timeout: float) -> tuple[bool, str]:
    if not args.registry:
        if args.port:
            address = f"{args.host}:{args.port}"
            return _tcp_ok(address, timeout), f"control port {address}"
        return True, "no registry and no fixed --port: nothing to probe"

    async def lookup():
        from tandem.registry import make_registry

        registry = make_registry(args.registry)
        try:
            return await asyncio.wait_for(registry.workers(), timeout)
        finally:
            await registry.close()

    try:
        workers = asyncio.run(lookup())
    except Exception as e:  # any failure to read the registry is "unhealthy", with its reason
        return False, f"registry {args.registry}: {type(e).__name__}: {e}"
    mine = [w for w in workers if w.worker_id == args.worker_id]
    if not mine:
        return False, f"{args.worker_id} is not registered in {args.registry} (yet)"
    address = mine[0].address
    if not _tcp_ok(address, timeout):
        return False, f"{args.worker_id} registered at {address}, which does not accept"
    return True, f"{args.worker_id} registered and accepting at {address}"


def check(argv: Sequence[str], min_workers: int = 1, timeout: float = 3.0) -> tuple[bool, str]:
    """Is the service that ``argv`` starts healthy? (healthy, one-line reason)."""
    if not argv or argv[0] not in SERVICE_ROLES:
        return True, "not a service: nothing to probe"
    args = _parse(argv)
    if argv[0] in ("router", "serve"):
        return check_router(args, min_workers, timeout)
    return check_worker(args, timeout)


def main(argv: Sequence[str] | None = None) -> int:
    from tandem import env

    argv = list(sys.argv[1:] if argv is None else argv)
    settings = env.container_settings()
    state = Path(settings.get("TANDEM_STATE_FILE") or "/tmp/tandem-container.json")
    if argv[:1] == ["health"]:
        try:
            saved = json.loads(state.read_text())["argv"]
        except (OSError, ValueError, KeyError) as e:
            print(f"unhealthy: no state file {state}: {e}")
            return 1
        ok, reason = check(saved, min_workers=int(settings.get("TANDEM_HEALTH_MIN_WORKERS", "1")))
        print(("healthy: " if ok else "unhealthy: ") + reason)
        return 0 if ok else 1
    if argv[:1] != ["run"] or len(argv) < 2:
        print("usage: python -m tandem.container run ROLE [FLAGS...] | health", file=sys.stderr)
        return 2
    final = service_argv(argv[1], argv[2:], settings)
    state.write_text(json.dumps({"argv": final}))
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "tandem.cli", *final])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
