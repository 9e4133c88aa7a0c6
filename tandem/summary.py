"""Start-up summaries: what an operator needs to see once a service is up (pure; no torch).

Built from workers' ``hello`` frames (``tandem.protocol``), so the router describes workers
the way they describe themselves: role, address, device, dtype, KV blocks and tokens, host
tier, policy and batch limits. ``tandem serve`` prints ``serve_summary``, a standalone router
``router_summary``, a standalone worker ``worker_summary``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_INDENT = "  "


@dataclass(frozen=True)
class WorkerLine:
    """One worker as the router sees it at start-up (``hello`` is None: not connected)."""

    address: str
    hello: dict[str, Any] | None
    pid: int | None = None
    role: str | None = None  # known before the hello (serve started it)


def _kv(hello: dict[str, Any]) -> str:
    blocks, size = hello.get("kv_blocks"), hello.get("block_size")
    if blocks is None or size is None:
        return f"KV {blocks} blocks"
    text = f"KV {blocks} blocks x {size} tokens = {blocks * size} tokens"
    host = hello.get("host_kv_blocks") or 0
    return text + (f", host tier {host} blocks" if host else ", no host tier")


def _engine(hello: dict[str, Any]) -> str:
    chunked = "chunked prefill" if hello.get("chunked_prefill", True) else "whole prefills"
    return (
        f"policy {hello.get('policy', '?')}, {hello.get('max_num_seqs', '?')} seqs and "
        f"{hello.get('max_num_batched_tokens', '?')} tokens per iteration, {chunked}"
    )


def _model(hello: dict[str, Any]) -> str:
    return (
        f"{hello.get('model', '?')} (vocab {hello.get('vocab_size', '?')}, "
        f"max_model_len {hello.get('max_model_len', '?')})"
    )


def _worker_lines(workers: Sequence[WorkerLine]) -> list[str]:
    lines = []
    width = max((len(w.role or (w.hello or {}).get("role", "?")) for w in workers), default=0)
    for w in workers:
        role = (w.hello or {}).get("role") or w.role or "?"
        pid = f"  pid {w.pid}" if w.pid is not None else ""
        head = f"{_INDENT * 2}{role:<{width}}  {w.address}{pid}"
        if w.hello is None:
            lines.append(head + "  (not connected yet)")
            continue
        h = w.hello
        lines.append(f"{head}  {h.get('device', '?')} {h.get('dtype', '?')}, {_kv(h)}")
    return lines


def _field(name: str, value: str) -> str:
    return f"{_INDENT}{name:<11}{value}"


def serve_summary(
    url: str,
    served_model_name: str,
    workers: Sequence[WorkerLine],
    *,
    limits: str,
    auth: str | None = None,
    needs_key: bool = False,
    restart: bool,
    access_log: str | None,
) -> str:
    """``tandem serve`` once its router is connected to every worker."""
    hellos = [w.hello for w in workers if w.hello is not None]
    first = hellos[0] if hellos else {}
    restart_text = (
        "one that dies is restarted with backoff (off: --no-restart-workers)"
        if restart
        else "one that dies stays dead (--no-restart-workers)"
    )
    lines = [
        f"tandem serve: {served_model_name!r} at {url} (OpenAI API under /v1)",
        _field("model", _model(first)),
        _field("engine", _engine(first)),
        _field("limits", limits),
        *([_field("auth", auth)] if auth else []),
        _field("workers", f"{len(workers)}, {restart_text}"),
        *_worker_lines(workers),
        _field("access log", _access(access_log)),
        _field("try", f"curl -s {url}/v1/completions -H 'Content-Type: application/json' "
               + ('-H "Authorization: Bearer $TANDEM_API_KEY" ' if needs_key else "")
               + """-d '{"prompt": "Hello", "max_tokens": 16}'"""),
    ]  # fmt: skip
    return "\n".join(lines)


def router_summary(
    url: str,
    served_model_name: str,
    model_dir: str,
    workers: Sequence[WorkerLine],
    *,
    limits: str,
    auth: str | None = None,
    registry: str | None,
    access_log: str | None,
) -> str:
    """A standalone ``tandem router``: its workers are listed as far as they are connected."""
    found = f"from {registry} ({len(workers)} registered now)" if registry else str(len(workers))
    lines = [
        f"tandem router: {served_model_name!r} at {url} (OpenAI API under /v1)",
        _field("model", f"{model_dir} (tokenizer and chat template)"),
        _field("limits", limits),
        *([_field("auth", auth)] if auth else []),
        _field("workers", found),
        *_worker_lines(workers),
        _field("access log", _access(access_log)),
    ]
    return "\n".join(lines)


def worker_summary(
    command: str, address: str, hello: dict[str, Any], registry: str | None, ttl: float
) -> str:
    """A standalone ``tandem decode-worker`` / ``prefill-worker`` once it listens."""
    where = (
        f"registered in {registry} as {hello.get('worker_id')} (TTL {ttl:g} s)"
        if registry
        else "not in a registry: give the router --worker " + address
    )
    lines = [
        f"tandem {command}: {hello.get('role', '?')} worker listening on {address}",
        _field("model", _model(hello)),
        _field("device", f"{hello.get('device', '?')} {hello.get('dtype', '?')}, {_kv(hello)}"),
        _field("engine", _engine(hello)),
    ]
    if hello.get("kv_address"):
        lines.append(_field("KV in", str(hello["kv_address"])))
    lines.append(_field("registry", where))
    return "\n".join(lines)


def limits_text(max_in_flight: int, request_timeout: float) -> str:
    return f"{max_in_flight} requests in flight (then 429), {request_timeout:g} s per request"


def _access(target: str | None) -> str:
    if target is None:
        return "off (--access-log to turn it on)"
    return "stdout" if target == "-" else target
