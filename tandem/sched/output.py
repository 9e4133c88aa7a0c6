"""What the scheduler hands the runner, and what the runner hands back (pure).

One iteration: ``SchedulerOutput`` → runner → ``RunnerOutput`` →
``Scheduler.update_from_output``. The runner must apply, in this order:
``swap_out`` copies, then ``swap_in`` copies, then the forward pass. The scheduler relies
on that order: device blocks given up by a swap-out may be handed to another request in
the same iteration, whose forward pass overwrites them only after the copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.request import Request


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute ``token_ids`` at positions ``start_pos ..``; sample if ``sample``."""

    request: Request
    token_ids: list[int]
    start_pos: int  # == request.num_computed_tokens when scheduled
    block_table: list[int]  # device blocks covering start_pos + len(token_ids) tokens
    sample: bool  # this chunk completes the request's tokens: produce the next one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class BlockCopy:
    """Copy K/V of ``src`` blocks (in ``src_tier``) to ``dst`` blocks, pairwise."""

    src_tier: str  # "device" or "host"
    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    swap_out: list[BlockCopy] = field(default_factory=list)  # device -> host
    swap_in: list[BlockCopy] = field(default_factory=list)  # host -> device
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.swap_out and not self.swap_in


@dataclass
class RunnerOutput:
    """Sampled token (and optional logprobs) per request whose chunk had ``sample``."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
