"""One streaming request against an OpenAI-compatible server, timed as vLLM's benchmark does.

Definitions (per request, wall-clock ``time.perf_counter``):

- **TTFT**: from sending the request to the first chunk that carries output text.
- **ITL**: the gaps between consecutive chunks that carry output text.
- **E2E latency** (= JCT): from sending to the end of the stream (``data: [DONE]``).
- **TPOT**: ``(latency - ttft) / (output_tokens - 1)``, for requests with > 1 output token.
- **output tokens**: the server's ``usage.completion_tokens`` (requested with
  ``stream_options.include_usage``); if it sends none, the generated text re-tokenized with the
  run's tokenizer.

A request that gets a non-200 status, an ``error`` event, a broken stream, no ``[DONE]`` or a
timeout is an error: it is recorded with its message, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loadgen.dataset import Job
from loadgen.tokens import PromptTokenizer


@dataclass
class RequestRecord:
    index: int
    priority: int | None
    prompt_len: int  # tokens under the run's tokenizer (server's count if it reports one)
    requested_output_len: int
    start: float = 0.0  # seconds after the run started
    ttft: float | None = None
    latency: float | None = None
    output_len: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    status: int | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_len < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


@dataclass(frozen=True)
class Target:
    url: str  # server root, e.g. http://127.0.0.1:8000
    model: str
    endpoint: str = "completions"  # or "chat"
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def body(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": self.temperature,
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": job.prompt}]
            body["max_completion_tokens"] = job.output_len
        else:
            body["prompt"] = job.prompt
            body["max_tokens"] = job.output_len
        if self.ignore_eos:
            body["ignore_eos"] = True
        if job.priority is not None:
            body["priority"] = job.priority
        body.update(self.extra_body)
        return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"] or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def send(
    session: aiohttp.ClientSession,
    target: Target,
    job: Job,
    run_start: float,
    tok: PromptTokenizer | None,
) -> RequestRecord:
    rec = RequestRecord(job.index, job.priority, job.prompt_len, job.output_len)
    t0 = time.perf_counter()
    rec.start = t0 - run_start
    usage: dict[str, Any] = {}
    try:
        done = await asyncio.wait_for(
            _stream(session, target, job, rec, t0, usage), target.timeout_s
        )
        rec.latency = time.perf_counter() - t0
        if rec.error is None and rec.status == 200 and not done:
            rec.error = "stream ended without [DONE]"
        if rec.error is None and rec.ttft is None:
            rec.ttft = rec.latency  # an empty completion: first (and only) event at the end
    except asyncio.TimeoutError:
        rec.error = f"timeout after {target.timeout_s:g} s"
    except asyncio.CancelledError:  # only the runner cancels: the run was interrupted
        rec.error = "cancelled: run interrupted"
    except (aiohttp.ClientError, OSError, json.JSONDecodeError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    if usage.get("completion_tokens") is not None:
        rec.output_len = int(usage["completion_tokens"])
    elif tok is not None:
        rec.output_len = tok.count(rec.text)
    else:
        rec.output_len = len(rec.itl) + (rec.ttft is not None)
    if usage.get("prompt_tokens") is not None:
        rec.prompt_len = int(usage["prompt_tokens"])
    return rec


async def _stream(
    session: aiohttp.ClientSession,
    target: Target,
    job: Job,
    rec: RequestRecord,
    t0: float,
    usage: dict[str, Any],
) -> bool:
    """Read one SSE stream into ``rec`` (and the last usage into ``usage``); True when it
    ended with ``[DONE]``."""
    last = t0
    async with session.post(target.url + target.path, json=target.body(job)) as r:
        rec.status = r.status
        if r.status != 200:
            rec.error = f"HTTP {r.status}: {_error_message(await r.text())}"
            return False
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return True
            chunk = json.loads(payload)
            if "error" in chunk:
                rec.error = f"stream error: {_error_message(chunk)}"
                continue
            text = _chunk_text(chunk)
            now = time.perf_counter()
            if text:
                if rec.ttft is None:
                    rec.ttft = now - t0
                else:
                    rec.itl.append(now - last)
                last = now
                rec.text += text
            if chunk.get("usage"):
                usage.update(chunk["usage"])
    return False


def _error_message(text_or_obj: str | dict[str, Any]) -> str:
    obj = text_or_obj
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError:
            return obj.strip()[:200]
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message", err))[:200]
    return str(err)[:200]
