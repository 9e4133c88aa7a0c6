"""A request on the wire: its SamplingParams, and the whole running state that a KV
handoff or a migration carries with the blocks (pure; msgpack-able dicts)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from tandem.request import Request, SamplingParams


class UnknownSamplingField(ValueError):
    pass


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
        raise UnknownSamplingField(f"unknown sampling fields {sorted(unknown)}")
    return SamplingParams(
        **{
            **d,
            "stop": tuple(d.get("stop", ())),
            "stop_token_ids": tuple(d.get("stop_token_ids", ())),
            "logit_bias": tuple(tuple(pair) for pair in d.get("logit_bias", ())),
        }
    )


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
