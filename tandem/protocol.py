"""Wire messages between router and workers: msgpack frames on persistent TCP (pure).

Frame: 4-byte big-endian length, then a msgpack map with a ``type`` key. Messages:

router → worker
  ``submit``  {request_id, prompt_token_ids, params (SamplingParams fields), priority}
  ``abort``   {request_ids: [...]}
worker → router
  ``hello``   {role, model, compat, kv_blocks, max_model_len, vocab_size, ...}   (first frame;
              also device, dtype, block_size, host_kv_blocks, policy, max_num_seqs,
              max_num_batched_tokens, chunked_prefill, worker_id for start-up summaries)
  ``tokens``  {items: [[request_id, new_token_ids, finish_reason|None, error|None,
                        logprobs|None], ...]}   (one frame per engine iteration, many requests)
  ``stats``   {running, waiting, swapped, kv_free, kv_used, preemptions, ...}   (periodic)

A worker answers every accepted ``submit`` with tokens until a finished item (a
``finish_reason``, or an ``error`` for a request it refused), so nothing accepted is lost
silently. Frames larger than ``MAX_FRAME`` are refused.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import asdict, fields
from typing import Any

import msgpack

from tandem.request import Request, SamplingParams

MAX_FRAME = 64 * 2**20
# Prefix of a ``tokens`` item error meaning "this worker can no longer serve the request"
# (it died, or a handoff's outcome is unknown): the router may re-run it elsewhere.
WORKER_LOST = "worker-lost:"
_HEADER = struct.Struct(">I")


class ProtocolError(RuntimeError):
    pass


def encode(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Next message; raises ``asyncio.IncompleteReadError`` at a clean end of stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ProtocolError(f"peer sent a frame of {size} bytes (limit {MAX_FRAME})")
    msg = msgpack.unpackb(await reader.readexactly(size), raw=False, strict_map_key=False)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError("malformed frame: not a map with a 'type'")
    return msg


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    d = asdict(params)
    d["stop"] = list(params.stop)
    d["stop_token_ids"] = list(params.stop_token_ids)
    d["logit_bias"] = [[t, b] for t, b in params.logit_bias]
    return d


_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}


def params_from_wire(d: dict[str, Any]) -> SamplingParams:
    unknown = set(d) - _PARAM_FIELDS
    if unknown:
        raise ProtocolError(f"unknown sampling fields {sorted(unknown)}")
    return SamplingParams(
        **{
            **d,
            "stop": tuple(d.get("stop", ())),
            "stop_token_ids": tuple(d.get("stop_token_ids", ())),
            "logit_bias": tuple(tuple(pair) for pair in d.get("logit_bias", ())),
        }
    )


def submit(
    request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
) -> dict[str, Any]:
    return {
        "type": "submit",
        "request_id": request_id,
        "prompt_token_ids": list(prompt_token_ids),
        "params": params_to_wire(params),
        "priority": priority,
    }


def abort(request_ids: list[str]) -> dict[str, Any]:
    return {"type": "abort", "request_ids": list(request_ids)}


def request_state(
    req: Request, num_computed_tokens: int, policy_state: dict[str, Any]
) -> dict[str, Any]:
    """A running request as a msgpack-able dict: what a KV handoff or migration carries."""
    return {
        "request_id": req.request_id,
        "prompt_token_ids": list(req.prompt_token_ids),
        "output_token_ids": list(req.output_token_ids),
        "output_logprobs": [[lp, [list(t) for t in top]] for lp, top in req.output_logprobs],
        "params": params_to_wire(req.sampling_params),
        "priority": req.priority,
        "eos_token_ids": list(req.eos_token_ids),
        "num_computed_tokens": num_computed_tokens,
        "num_preemptions": req.num_preemptions,
        "policy_state": dict(policy_state),
    }


def request_from_state(state: dict[str, Any], arrival_time: float) -> Request:
    """Inverse of ``request_state`` (``num_computed_tokens`` is set by the importer)."""
    req = Request(
        request_id=state["request_id"],
        prompt_token_ids=list(state["prompt_token_ids"]),
        sampling_params=params_from_wire(state["params"]),
        arrival_time=arrival_time,
        priority=int(state.get("priority", 0)),
        eos_token_ids=tuple(state.get("eos_token_ids", ())),
    )
    req.output_token_ids = list(state.get("output_token_ids", ()))
    req.output_logprobs = [
        (lp, [tuple(t) for t in top]) for lp, top in state.get("output_logprobs", ())
    ]
    req.num_preemptions = int(state.get("num_preemptions", 0))
    return req
