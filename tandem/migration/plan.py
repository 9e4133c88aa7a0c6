"""Stages of one live migration, their transfer ids, and fault injection points (pure).

A migration moves one running request from a source worker to a destination in stages
(Llumnix). Each stage is one ordinary two-sided KV transfer (``kvtransfer.base``)::

    stage 0..k-1 (copy)   blocks [sent, full) — the blocks filled since the last stage.
                          Full blocks never change again, so the source keeps decoding.
    stage k (final)       blocks [sent, total) — the request leaves the source's batch,
                          the rest (the partial last block included) and the request state
                          go, the destination commits and resumes it.

``plan_stage`` decides which: the final stop-and-copy once at most
``StagePolicy.final_blocks`` blocks are unsent, when nothing new filled up since the last
stage, or at the stage limit; ``min_copy_stages`` holds the final stage back until that
many copy stages went (the source then waits for a block to fill).

Block indices are positions in the request's block table; ``total`` is
``ceil(num_computed_tokens / block_size)`` and ``full`` is ``num_computed_tokens //
block_size``. Invariant: ``0 <= sent <= full <= total``.
"""

from __future__ import annotations

from dataclasses import dataclass

FAULT_SIDES = ("source", "dest")
FAULT_POINTS = ("first", "middle", "final", "commit")
_SEP = "|mig"


@dataclass(frozen=True)
class StagePolicy:
    final_blocks: int = 2  # stop-and-copy once at most this many blocks are unsent
    max_stages: int = 8  # stages in all, the final one included
    min_copy_stages: int = 0  # copy stages before the final one (waits for blocks to fill)

    def __post_init__(self) -> None:
        if self.final_blocks < 0:
            raise ValueError(f"final_blocks must be >= 0, got {self.final_blocks}")
        if self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages}")
        if not 0 <= self.min_copy_stages < self.max_stages:
            raise ValueError(
                f"min_copy_stages must be in [0, max_stages), got {self.min_copy_stages}"
            )


@dataclass(frozen=True)
class Stage:
    index: int
    start: int  # first block (table position) this stage sends
    end: int  # one past the last
    final: bool

    @property
    def num_blocks(self) -> int:
        return self.end - self.start


def plan_stage(
    policy: StagePolicy, index: int, sent: int, num_computed_tokens: int, block_size: int
) -> Stage:
    """Stage ``index`` of a migration that has sent blocks ``[0, sent)`` so far.

    A copy stage is returned only when it has at least one new full block to send (the
    caller waits for one when ``min_copy_stages`` is not reached yet; see ``wants_block``).
    ``ValueError`` if ``sent`` exceeds the full blocks (the request lost its KV).
    """
    full = num_computed_tokens // block_size
    total = -(-num_computed_tokens // block_size)
    if not 0 <= sent <= full:
        raise ValueError(
            f"{sent} blocks sent but only {full} full blocks remain ({num_computed_tokens} tokens)"
        )
    if index + 1 >= policy.max_stages or full == sent:
        return Stage(index, sent, total, final=True)
    if total - sent <= policy.final_blocks and index >= policy.min_copy_stages:
        return Stage(index, sent, total, final=True)
    return Stage(index, sent, full, final=False)


def wants_block(
    policy: StagePolicy, index: int, sent: int, num_computed_tokens: int, bs: int
) -> bool:
    """Whether stage ``index`` should wait for one more full block before it is planned:
    the policy asks for more copy stages and nothing new has filled up yet."""
    return (
        index < policy.min_copy_stages
        and index + 1 < policy.max_stages
        and num_computed_tokens // bs == sent
    )


@dataclass(frozen=True)
class TransferId:
    """The id a stage's KV transfer carries: ``{request_id}|mig{migration}.{index}`` with
    an ``f`` after the index on the final stage. The receiver tells migration stages from
    handoffs by it, before any state has arrived (reserve sees only the id)."""

    request_id: str
    migration_id: int
    index: int
    final: bool

    def __str__(self) -> str:
        return f"{self.request_id}{_SEP}{self.migration_id}.{self.index}{'f' if self.final else ''}"

    @classmethod
    def of(cls, request_id: str, migration_id: int, stage: Stage) -> TransferId:
        return cls(request_id, migration_id, stage.index, stage.final)

    @classmethod
    def parse(cls, text: str) -> TransferId | None:
        """The id's parts, or ``None`` for an id that is not a migration stage's."""
        rid, sep, tail = text.rpartition(_SEP)
        mid, dot, index = tail.partition(".")
        final = index.endswith("f")
        index = index[:-1] if final else index
        if not (sep and rid and dot and mid.isdigit() and index.isdigit()):
            return None
        return cls(rid, int(mid), int(index), final)


@dataclass(frozen=True)
class Fault:
    """A test-only injected abort (``TANDEM_MIGRATION_FAULTS=1``; see ``tandem.env``).

    ``side`` source: the source gives up at that point (``first``/``middle``: before
    sending that copy stage; ``final``: after taking the request out of its batch, before
    sending the rest). ``side`` dest: the destination fails (``first``/``middle``: its
    commit of that copy stage raises; ``final``: it refuses the final stage's reservation;
    ``commit``: the final commit raises after the bytes were written).
    """

    side: str
    at: str

    def __post_init__(self) -> None:
        if self.side not in FAULT_SIDES:
            raise ValueError(f"fault side must be one of {FAULT_SIDES}, got {self.side!r}")
        if self.at not in FAULT_POINTS:
            raise ValueError(f"fault point must be one of {FAULT_POINTS}, got {self.at!r}")
        if self.side == "source" and self.at == "commit":
            raise ValueError("a source fault at 'commit' does not exist (the source never commits)")

    @classmethod
    def parse(cls, text: str | None) -> Fault | None:
        """``"SIDE:POINT"`` (e.g. ``"dest:middle"``), or ``None`` for none."""
        if not text:
            return None
        side, sep, at = str(text).partition(":")
        if not sep:
            raise ValueError(f"fault must be SIDE:POINT, got {text!r}")
        return cls(side, at)

    def __str__(self) -> str:
        return f"{self.side}:{self.at}"

    def hits(self, side: str, stage_index: int, final: bool, point: str | None = None) -> bool:
        """Whether this fault fires on ``side`` at this stage (``point`` narrows the final
        stage to ``final`` or ``commit``)."""
        if side != self.side:
            return False
        if self.at == "first":
            return stage_index == 0 and not final
        if self.at == "middle":
            return stage_index >= 1 and not final
        return final and (point or "final") == self.at
