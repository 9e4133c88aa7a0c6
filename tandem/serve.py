"""``tandem serve`` and ``tandem router``: the router's HTTP app in this process, and for
``serve`` the worker processes behind it, supervised (pure: no torch).

``tandem serve``'s life:

1. ``tandem.cli`` validates the flags and turns them into worker command lines (one
   colocated worker, or the prefill and decode pools); ``serve`` gives each a loopback port.
2. The HTTP socket is bound first, so a taken port fails before any worker loads a model.
3. ``Supervisor`` starts the workers and restarts one that dies (``tandem.supervisor``);
   their ready handshake goes to it on a pipe.
4. The router connects to every worker (its ``on_startup``); then this module prints the
   start-up summary (``tandem.summary``): model, devices, KV blocks and tokens, policy,
   limits, workers, URL.
5. SIGTERM or SIGINT stops the router, then the supervisor stops the workers. When a role
   has no worker left, the supervisor sends SIGTERM to this process: serve exits with
   status 1 and says why.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tandem import logs, summary
from tandem.supervisor import Supervisor, WorkerSpec

if TYPE_CHECKING:
    from router.app import Router


def listen_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket on ``host:port`` (OSError if it cannot be had).

    A deep backlog: 1,000 clients connecting at once must not see dropped handshakes."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def run_router(
    model: str,
    workers: Sequence[str],
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    describe: Callable[[Router, str], str],
    sock: socket.socket | None = None,
) -> None:
    """Serve the router's app on ``sock`` (default: bind ``--host``/``--port``) until SIGTERM
    or SIGINT. ``describe(router, url)`` is the start-up summary, printed once the router is
    connected to its static workers."""
    from aiohttp import web

    from router.app import ROUTER_KEY, RouterConfig, build_app, run_kwargs
    from router.migration import MigrationConfig
    from tandem.auth import load_secret

    try:
        migration = MigrationConfig(
            mode=args.migration,
            interval_s=args.migration_interval,
            min_gap=args.migration_min_gap,
            final_blocks=args.migration_final_blocks,
            max_stages=args.migration_max_stages,
        )
        config = RouterConfig(
            model_dir=model,
            served_model_name=args.served_model_name or Path(model).name,
            workers=tuple(workers),
            registry_url=getattr(args, "registry", None),
            cost_model=getattr(args, "cost_model", None),
            max_in_flight=args.max_in_flight,
            request_timeout=args.request_timeout,
            migration=migration,
            dispatch=args.dispatch,
            max_body_bytes=int(args.max_body_mb * 2**20),
            header_timeout=args.header_timeout,
            body_timeout=args.body_timeout,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens_limit=args.max_tokens_limit,
            auth=auth_config(args, sock),
            cluster_secret=load_secret(args.cluster_secret_file),
        )
        app = build_app(config)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        access_log = logs.access_logger(args.access_log)
    except OSError as e:
        parser.error(f"--access-log: {e}")
    if sock is None:
        try:
            sock = listen_socket(args.host, args.port)
        except OSError as e:
            parser.error(f"cannot listen on {args.host}:{args.port}: {e}")
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    async def announce(app: web.Application) -> None:  # after the router's own start-up
        print(describe(app[ROUTER_KEY], url), flush=True)

    app.on_startup.append(announce)
    install_uvloop()
    # handler_cancellation: a client that disconnects cancels its handler (aiohttp's default
    # is off), so a non-streaming request is aborted at the worker too.
    web.run_app(
        app,
        sock=sock,
        print=None,
        handler_cancellation=True,
        access_log=access_log,
        access_log_format=logs.ACCESS_FORMAT,
        **run_kwargs(config),
    )


def auth_config(args: argparse.Namespace, sock: socket.socket | None = None):
    """The router's ``AuthConfig`` from the flags and ``tandem.env`` (flag keys and
    TANDEM_API_KEY together; a flag's admin or metrics key wins over the environment's).
    Loopback-only is judged from the bound socket when there is one, else ``--host``."""
    from router.auth import AuthConfig, listens_on_loopback
    from tandem import env

    host = sock.getsockname()[0] if sock is not None else args.host
    return AuthConfig(
        api_keys=tuple(dict.fromkeys([*args.api_key, *env.api_keys()])),
        admin_key=args.admin_key or env.admin_key(),
        metrics_key=args.metrics_key or env.metrics_key(),
        loopback_only=listens_on_loopback(host),
        max_concurrent_per_key=args.max_concurrent_per_key,
    )


def _auth_line(router: Router) -> str:
    cluster = "cluster secret on" if router.config.cluster_secret else "no cluster secret"
    return f"{router.config.auth.describe()}; {cluster}"


def describe_router(args: argparse.Namespace, model: str) -> Callable[[Router, str], str]:
    def describe(router: Router, url: str) -> str:
        return summary.router_summary(
            url,
            router.config.served_model_name,
            model,
            [summary.WorkerLine(w.address, w.hello) for w in router.workers],
            limits=summary.limits_text(args.max_in_flight, args.request_timeout),
            auth=_auth_line(router),
            registry=args.registry,
            access_log=args.access_log,
        )

    return describe


def serve(
    model: str,
    roles: Sequence[tuple[str, str, Sequence[str]]],
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
) -> int:
    """Run ``roles`` — (subcommand, kind, flags) per worker process — behind a router.

    Every worker listens on its own free loopback port (``--worker-port`` for the first)."""
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        parser.error(f"cannot listen on {args.host}:{args.port}: {e}")
    specs = []
    for i, (command, kind, flags) in enumerate(roles):
        port = args.worker_port if (i == 0 and args.worker_port) else _free_port()
        argv = (sys.executable, "-m", "tandem.cli", command, "--port", str(port), "--quiet",
                *flags)  # fmt: skip
        specs.append(WorkerSpec(command, kind, f"127.0.0.1:{port}", argv))

    def fatal(reason: str) -> None:  # watch thread: stop the router; run_router returns
        os.kill(os.getpid(), signal.SIGTERM)

    supervisor = Supervisor(specs, restart=not args.no_restart_workers, on_fatal=fatal)

    def describe(router: Router, url: str) -> str:
        clients = {w.address: w for w in router.workers}
        lines = [
            summary.WorkerLine(
                slot.spec.address, clients[slot.spec.address].hello, slot.pid, slot.spec.kind
            )
            for slot in supervisor.slots
        ]
        return summary.serve_summary(
            url,
            router.config.served_model_name,
            lines,
            limits=summary.limits_text(args.max_in_flight, args.request_timeout),
            auth=_auth_line(router),
            needs_key=bool(router.config.auth.api_keys),
            restart=supervisor.restart,
            access_log=args.access_log,
        )

    supervisor.start()
    try:
        run_router(model, [s.address for s in specs], args, parser, describe, sock=sock)
    finally:
        supervisor.stop()
    if supervisor.fatal is not None:
        print(f"error: {supervisor.fatal}; tandem serve stopped", file=sys.stderr)
        return 1
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
