"""Online output-length predictor for ALISE-style speculative priority (pure + numpy).

Choice: k-nearest neighbours over a request's *prompt*, learned online from the requests
that finished. Features: two bags of hashed token bigrams, L2-normalised each — the
prompt's head (first ``head_len`` tokens: system prompt, instruction, template — what
decides the kind of answer) weighted by ``head_weight``, and the rest weighted by
``1 - head_weight`` — plus log input length scaled by ``length_weight``. One bag over the
whole prompt does not work: a long prompt body drowns the few bigrams of its instruction
(measured in bench/sched_sim.py: ALISE went from 1.1x to the figures in RESULTS.md). Prediction: the median output length of the ``k`` most similar of
the last ``capacity`` finished requests. Before ``min_history`` finished requests it
returns a running mean (the prior). Why kNN: it needs no training loop, adapts as the
workload drifts (old requests fall out of the ring buffer), costs one small mat-vec per
arrival, and workloads in production are dominated by repeated templates where
neighbours are informative. A learned regressor could replace it behind ``predict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class OutputLengthPredictor:
    def __init__(
        self,
        dim: int = 1024,
        capacity: int = 2048,
        k: int = 8,
        min_history: int = 8,
        prior: float = 128.0,
        length_weight: float = 0.05,
        head_len: int = 32,
        head_weight: float = 0.9,
    ) -> None:
        if dim < 16 or dim % 2 or capacity < 1 or k < 1 or prior <= 0 or not 0 <= head_weight <= 1:
            raise ValueError(
                "predictor needs an even dim >= 16, capacity >= 1, k >= 1, prior > 0, head_weight in [0, 1]"
            )
        self.dim, self.capacity, self.k, self.min_history = dim, capacity, k, min_history
        self.length_weight = length_weight
        self.head_len, self.head_weight = head_len, head_weight
        self._features = np.zeros((capacity, dim + 1), dtype=np.float32)
        self._lengths = np.zeros(capacity, dtype=np.float32)
        self._count = 0  # total observations (ring index = count % capacity)
        self._mean = prior

    def featurize(self, prompt_token_ids: Sequence[int]) -> np.ndarray:
        half = self.dim // 2
        v = np.zeros(self.dim + 1, dtype=np.float32)
        ids = list(prompt_token_ids)
        head, rest = (
            ids[: self.head_len],
            ids[self.head_len - 1 :] if len(ids) > self.head_len else [],
        )
        for part, offset, weight in (
            (head, 0, self.head_weight),
            (rest, half, 1.0 - self.head_weight),
        ):
            bag = v[offset : offset + half]
            if len(part) == 1:
                bag[(part[0] * 2654435761) % half] = 1.0
            # Bigram hashing with a multiplicative hash: cheap, stable across processes.
            for a, b in zip(part, part[1:], strict=False):
                bag[((a * 1000003) ^ b) * 2654435761 % half] += 1.0
            norm = float(np.linalg.norm(bag))
            if norm > 0:
                bag *= weight / norm
        v[self.dim] = self.length_weight * math.log1p(len(ids))
        return v

    def predict(self, prompt_token_ids: Sequence[int]) -> float:
        n = min(self._count, self.capacity)
        if n < self.min_history:
            return self._mean
        x = self.featurize(prompt_token_ids)
        feats = self._features[:n]
        # Similarity: cosine of the bigram part minus the distance in log length.
        sim = feats[:, : self.dim] @ x[: self.dim] - np.abs(feats[:, self.dim] - x[self.dim])
        k = min(self.k, n)
        nearest = np.argpartition(-sim, k - 1)[:k]
        return float(max(1.0, np.median(self._lengths[nearest])))

    @property
    def mean(self) -> float:
        """Running mean of observed output lengths (the prior before any)."""
        return self._mean

    def neighbour_lengths(self, prompt_token_ids: Sequence[int]) -> np.ndarray | None:
        """Output lengths of the ``k`` most similar finished requests, sorted ascending: an
        empirical predicted distribution (``predict`` is its median). ``None`` before
        ``min_history`` observations (only the prior is known)."""
        n = min(self._count, self.capacity)
        if n < self.min_history:
            return None
        x = self.featurize(prompt_token_ids)
        feats = self._features[:n]
        sim = feats[:, : self.dim] @ x[: self.dim] - np.abs(feats[:, self.dim] - x[self.dim])
        k = min(self.k, n)
        nearest = np.argpartition(-sim, k - 1)[:k]
        return np.sort(self._lengths[nearest])

    def observe(self, prompt_token_ids: Sequence[int], output_len: int) -> None:
        i = self._count % self.capacity
        self._features[i] = self.featurize(prompt_token_ids)
        self._lengths[i] = float(output_len)
        self._count += 1
        self._mean += (output_len - self._mean) / min(self._count, 1000)
