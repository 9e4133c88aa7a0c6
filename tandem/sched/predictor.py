"""Online output-length predictor for ALISE-style speculative priority (pure + numpy).

Choice: k-nearest neighbours over a request's *prompt*, learned online from the requests
that finished. Features: a bag of hashed token bigrams (``dim`` buckets, L2-normalised;
the same template or question type shares bigrams) plus log input length (scaled by
``length_weight``). Prediction: the median output length of the ``k`` most similar of
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
        dim: int = 512,
        capacity: int = 2048,
        k: int = 8,
        min_history: int = 8,
        prior: float = 128.0,
        length_weight: float = 0.25,
    ) -> None:
        if dim < 8 or capacity < 1 or k < 1 or prior <= 0:
            raise ValueError("predictor needs dim >= 8, capacity >= 1, k >= 1 and prior > 0")
        self.dim, self.capacity, self.k, self.min_history = dim, capacity, k, min_history
        self.length_weight = length_weight
        self._features = np.zeros((capacity, dim + 1), dtype=np.float32)
        self._lengths = np.zeros(capacity, dtype=np.float32)
        self._count = 0  # total observations (ring index = count % capacity)
        self._mean = prior

    def featurize(self, prompt_token_ids: Sequence[int]) -> np.ndarray:
        v = np.zeros(self.dim + 1, dtype=np.float32)
        ids = prompt_token_ids
        if len(ids) == 1:
            v[(ids[0] * 2654435761) % self.dim] = 1.0
        # Bigram hashing with a multiplicative hash: cheap, and stable across processes.
        for a, b in zip(ids, ids[1:], strict=False):
            v[((a * 1000003) ^ b) * 2654435761 % self.dim] += 1.0
        norm = float(np.linalg.norm(v[: self.dim]))
        if norm > 0:
            v[: self.dim] /= norm
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

    def observe(self, prompt_token_ids: Sequence[int], output_len: int) -> None:
        i = self._count % self.capacity
        self._features[i] = self.featurize(prompt_token_ids)
        self._lengths[i] = float(output_len)
        self._count += 1
        self._mean += (output_len - self._mean) / min(self._count, 1000)
