"""What the engine reports about a request after each step (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """State of one request after a step.

    ``token_ids``/``text`` hold everything generated so far; ``new_token_ids`` and
    ``delta_text`` what this step added (for streaming). ``text`` never ends in half a
    multi-byte character and never contains text past a stop string.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    prompt: str | None = None
    num_preemptions: int = 0
    # Prompt tokens whose K/V came from the prefix cache (Request.num_cached_tokens).
    num_cached_tokens: int = 0
