"""Iteration cost model: how long prefill and decode take on this hardware (pure).

    prefill_time(n)        = p0 + p1·n + p2·n²          (n new tokens; n² is attention)
    decode_time(b, ctx)    = d0 + d1·b + d2·ctx         (b sequences, ctx total context)
    iteration_time(...)    = a mixed batch: prefill and decode terms share one d0/p0

Skip-join MLFQ uses ``prefill_time`` to pick a request's first queue; ALISE uses both to
estimate remaining time; the simulator uses ``iteration_time`` as its clock. The
coefficients come from profiling at worker start-up (``tandem.runner.profile``, seconds
on the real model) or from a JSON file (``CostModel.load``). ``fit`` is plain least squares
with coefficients clipped at zero so estimates never go negative.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CostModel:
    prefill_base: float = 1e-3
    prefill_per_token: float = 1e-4
    prefill_per_token_sq: float = 0.0
    decode_base: float = 5e-3
    decode_per_seq: float = 1e-4
    decode_per_ctx_token: float = 1e-7

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and value >= 0.0):
                raise ValueError(
                    f"cost model coefficient {name} must be a number >= 0, got {value!r}"
                )

    def prefill_time(self, num_tokens: int) -> float:
        n = float(num_tokens)
        return self.prefill_base + self.prefill_per_token * n + self.prefill_per_token_sq * n * n

    def decode_time(self, batch_size: int, total_context: int) -> float:
        return (
            self.decode_base
            + self.decode_per_seq * batch_size
            + self.decode_per_ctx_token * total_context
        )

    def iteration_time(
        self, prefill_chunks: Sequence[int], num_decodes: int, total_context: int
    ) -> float:
        """One mixed iteration: prefill chunks (token counts) plus ``num_decodes`` decodes."""
        t = self.decode_base
        for n in prefill_chunks:
            t += self.prefill_per_token * n + self.prefill_per_token_sq * n * n
        return t + self.decode_per_seq * num_decodes + self.decode_per_ctx_token * total_context

    # ------------------------------------------------------------------ fitting and files
    @classmethod
    def fit(
        cls,
        prefill_samples: Sequence[tuple[int, float]],
        decode_samples: Sequence[tuple[int, int, float]],
    ) -> CostModel:
        """Least squares on (tokens, seconds) and (batch, context, seconds) samples."""
        if len(prefill_samples) < 3 or len(decode_samples) < 3:
            raise ValueError("cost model fit needs at least 3 prefill and 3 decode samples")
        n = np.array([s[0] for s in prefill_samples], dtype=float)
        t = np.array([s[1] for s in prefill_samples], dtype=float)
        p = _nnls(np.stack([np.ones_like(n), n, n * n], axis=1), t)
        b = np.array([s[0] for s in decode_samples], dtype=float)
        c = np.array([s[1] for s in decode_samples], dtype=float)
        td = np.array([s[2] for s in decode_samples], dtype=float)
        d = _nnls(np.stack([np.ones_like(b), b, c], axis=1), td)
        return cls(*(float(x) for x in (*p, *d)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read cost model file {path}: {e}") from None
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown cost model fields in {path}: {sorted(unknown)}")
        return cls(**data)


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 by active-set elimination (3 unknowns: tiny)."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            x[:] = 0.0
            x[active] = sol
            return x
        active.pop(int(np.argmin(sol)))
    return x
