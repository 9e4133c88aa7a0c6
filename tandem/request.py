"""Requests, their sampling parameters and their states (pure Python, no torch).

A ``Request`` counts its progress instead of flagging a phase:

    num_tokens          = len(prompt_token_ids) + len(output_token_ids)
    num_computed_tokens = tokens whose K/V are in the request's blocks

Invariant: ``0 <= num_computed_tokens <= num_tokens``.

With async scheduling a sampled token is known on the host one step after it was
sampled: ``num_pending_tokens`` (0 or 1) counts tokens sampled on the device whose ids
are not read yet. They are part of ``num_tokens`` (the scheduler builds the next step
over them) and appear as ``PLACEHOLDER_TOKEN`` in ``token_slice``; the runner fills them
in on the device. ``output_token_ids`` and ``all_token_ids`` hold known tokens only. A request needs a forward pass
over ``num_tokens - num_computed_tokens`` tokens; it produces a new token only in the
pass that brings ``num_computed_tokens`` up to ``num_tokens``. Prefill, chunked prefill,
decode and recompute-after-preemption are all the same rule.

State machine (``RequestStatus``)::

    WAITING ──schedule──► RUNNING ──stop / length──► FINISHED_STOPPED | FINISHED_LENGTH
       ▲                    │
       └──── PREEMPTED ◄────┘ (blocks freed: recompute, or moved to host: SWAPPED)
    any non-finished state ──abort──► FINISHED_ABORTED
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Stands for a sampled token whose id is still on the device (never a valid token id).
PLACEHOLDER_TOKEN = -1
# Temperatures below this sample as greedy (their limit); dividing logits by them overflows.
GREEDY_BELOW = 1e-5


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; resumes by recomputing its tokens
    SWAPPED = "swapped"  # blocks live in the host tier; resumes by swapping in
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI ``finish_reason`` for a finished request, else ``None``."""
        return self.value if self.is_finished else None


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Validated on construction.

    ``top_k=None`` and ``logprobs=None`` mean "off"; no field uses a sign to switch a
    feature. ``temperature == 0`` is greedy decoding, and so is any temperature below
    ``GREEDY_BELOW`` (1e-5): dividing logits by 1e-300 overflows to inf/NaN, and the limit of
    sampling as the temperature goes to 0 is the argmax anyway. ``seed`` makes sampling of one
    request reproducible whatever else shares its batch, across preemption and across
    engines (the generator is re-derived from the seed and the output position).
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # (token id, bias) pairs, ids unique and sorted: the bias is added to the token's logit
    # after penalties, before min_tokens and temperature (OpenAI's logit_bias). A dict
    # {id: bias} or any iterable of pairs is accepted and normalised.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        # Accept lists/strings from callers but store tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        pairs = tuple(sorted((t, b) for t, b in bias))
        object.__setattr__(self, "logit_bias", pairs)
        _check(
            all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t, _ in pairs)
            and len({t for t, _ in pairs}) == len(pairs),
            "logit_bias token ids must be distinct integers >= 0",
        )
        _check(
            all(_finite(b) and -100.0 <= b <= 100.0 for _, b in pairs),
            "logit_bias values must be numbers in [-100, 100]",
        )
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "max_tokens must be an integer >= 1",
        )
        _check(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            "min_tokens must be an integer >= 0",
        )
        _check(self.min_tokens <= self.max_tokens, "min_tokens must not exceed max_tokens")
        _check(_finite(self.temperature) and self.temperature >= 0.0, "temperature must be >= 0")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        _check(
            self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
            "top_k must be None (off) or an integer >= 1",
        )
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        _check(self.seed is None or isinstance(self.seed, int), "seed must be an integer")
        _check(
            _finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty must be in [-2, 2]",
        )
        _check(
            _finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty must be in [-2, 2]",
        )
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0.0,
            "repetition_penalty must be > 0",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop strings must be non-empty strings",
        )
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            "logprobs must be None or an integer in [0, 20]",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class Request:
    """One generation job as the scheduler and engine see it.

    ``priority`` is the API's priority class: lower runs first, above any policy order.
    ``eos_token_ids`` come from the model; they stop the request unless ``ignore_eos``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    # Per output token: (logprob of the sampled token, [(token_id, logprob), ...] top-n).
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_recomputes: int = 0  # preemptions that discarded its KV (recompute, not swap)
    # The token that stopped the request (EOS or a stop token id), if any.
    stop_reason: int | str | None = None
    # Prompt tokens whose K/V the prefix cache holds: the expected hit when it arrived,
    # then the real one when it was first admitted (``sched/prefix_cache.py``).
    num_cached_tokens: int = 0
    # Content names of its full blocks, in order (kvcache/prefix.py), as far as computed
    # so far; the scheduler extends it. Not state: any engine recomputes it from tokens.
    block_hashes: list[bytes] = field(default_factory=list, repr=False, compare=False)
    # Sampled on the device, id not read back yet (async scheduling): 0 or 1.
    num_pending_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def awaits_last_token(self) -> bool:
        """Its pending token is its last (``max_tokens``): nothing more to schedule."""
        return (
            self.num_pending_tokens > 0
            and len(self.output_token_ids) + self.num_pending_tokens
            >= self.sampling_params.max_tokens
        )

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (the decode hot
        path asks for one token of a long sequence every iteration). Pending positions
        are ``PLACEHOLDER_TOKEN``."""
        p = len(self.prompt_token_ids)
        known = p + len(self.output_token_ids)
        if end > known and self.num_pending_tokens:
            pending = min(end, known + self.num_pending_tokens) - max(start, known)
            return self.token_slice(start, known) + [PLACEHOLDER_TOKEN] * max(pending, 0)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output(self, token_id: int) -> RequestStatus | None:
        """Record a sampled token; return the finished status it causes, if any.

        Token-level stop rules live here (EOS, stop token ids, max_tokens, min_tokens);
        stop *strings* need the detokenizer and are checked by the output processor.
        A pending token (async scheduling) is resolved by this call.
        """
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1
        self.output_token_ids.append(token_id)
        params = self.sampling_params
        n = len(self.output_token_ids)
        if n >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                self.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if n >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None


def new_request(
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    vocab_size: int,
    eos_token_ids: tuple[int, ...],
    priority: int = 0,
    arrival_time: float | None = None,
) -> Request:
    """A validated new request: every prompt id must be an integer in [0, vocab_size)."""
    import time

    bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling_params=params,
        arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        priority=priority,
        eos_token_ids=eos_token_ids,
    )
