"""ALISE-style speculative priority: shortest estimated remaining time first.

    remaining(r) = prefill_time(uncomputed prompt tokens)
                 + max(predicted_output - generated, 1) · decode_step_time

This is SRPT on a predicted remaining time. The prediction is an empirical distribution:
the output lengths of the ``k`` most similar finished requests (``OutputLengthPredictor``,
kNN over the prompt, learned online). It is corrected as tokens are generated: with ``g``
tokens out, ``predicted_output`` is the ``quantile`` (default: the median) of the
neighbours' lengths *that exceed g* — the predicted distribution conditioned on the
request having lasted this long — so a request that outlives its short neighbours moves
on to its long ones instead of keeping a stale estimate. When no neighbour is longer than
``g`` (or before the predictor has history: the prior), the prediction is multiplied by
``growth`` (default 2) until it exceeds ``g``: a misprediction costs a bounded number of
re-rankings instead of starving it.

Prediction error: at finish, ``|initial prediction - true length| / true length`` of each
request that ran to completion is accumulated; ``prediction_error()`` returns the count,
mean relative error and mean signed log2 error (positive = over-predicted). Requests
not served for ``starvation_limit`` seconds jump ahead of all non-starved ones (the same
guard as mlfq). ``sort_key = (priority class, not starved, remaining, arrival order)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.request import Request
from tandem.sched.cost_model import CostModel
from tandem.sched.policy import SchedulingPolicy
from tandem.sched.predictor import OutputLengthPredictor


@dataclass
class _AliseState:
    predicted: float
    order: int
    last_served: float
    starved: bool = False
    initial: float = 0.0
    neighbours: Any = None  # sorted np.ndarray of neighbour lengths, or None (prior only)


class ALISEPolicy(SchedulingPolicy):
    name = "alise"

    def __init__(
        self,
        cost_model: CostModel | None = None,
        predictor: OutputLengthPredictor | None = None,
        starvation_limit: float = 60.0,
        growth: float = 2.0,
        quantile: float = 0.5,
        **_: Any,
    ) -> None:
        if starvation_limit <= 0 or growth <= 1.0 or not 0.0 <= quantile <= 1.0:
            raise ValueError("alise needs starvation_limit > 0, growth > 1, quantile in [0, 1]")
        self.quantile = quantile
        self.error_count = 0
        self.error_rel_sum = 0.0
        self.error_log2_sum = 0.0
        self.cost = cost_model or CostModel()
        self.predictor = predictor or OutputLengthPredictor()
        self.starvation_limit = starvation_limit
        self.growth = growth
        self._state: dict[str, _AliseState] = {}
        self._order = itertools.count()
        self.promotions = 0

    def on_arrival(self, request: Request, now: float) -> None:
        if request.request_id not in self._state:
            neighbours = self.predictor.neighbour_lengths(request.prompt_token_ids)
            st = _AliseState(self.predictor.mean, next(self._order), now, neighbours=neighbours)
            self._correct(st, request.num_output_tokens)
            st.initial = st.predicted
            self._state[request.request_id] = st

    def _correct(self, st: _AliseState, generated: int) -> None:
        """Condition the prediction on ``generated`` tokens so far (see module docstring)."""
        if st.neighbours is not None:
            longer = st.neighbours[st.neighbours > generated]
            if len(longer):
                st.predicted = max(float(np.quantile(longer, self.quantile)), 1.0)
                return
            st.neighbours = None  # outlived every neighbour: fall back to growth
            st.predicted = max(st.predicted, float(generated), 1.0)
        while generated >= st.predicted:
            st.predicted *= self.growth

    def remaining_time(self, request: Request) -> float:
        st = self._state.get(request.request_id)
        predicted = (
            st.predicted if st is not None else self.predictor.predict(request.prompt_token_ids)
        )
        uncomputed_prompt = max(request.num_prompt_tokens - request.num_computed_tokens, 0)
        left = max(predicted - request.num_output_tokens, 1.0)
        prefill = self.cost.prefill_time(uncomputed_prompt) if uncomputed_prompt else 0.0
        return prefill + left * self.cost.decode_time(1, request.num_tokens)

    def before_schedule(self, requests: Iterable[Request], now: float) -> None:
        for req in requests:
            st = self._state.get(req.request_id)
            if st is not None and not st.starved and now - st.last_served > self.starvation_limit:
                st.starved = True
                self.promotions += 1

    def sort_key(self, request: Request, now: float) -> tuple:
        st = self._state.get(request.request_id)
        order = st.order if st is not None else 0
        starved = st.starved if st is not None else False
        return (request.priority, not starved, self.remaining_time(request), order)

    def on_service(self, request: Request, num_tokens: int, seconds: float, now: float) -> None:
        st = self._state.get(request.request_id)
        if st is None:
            return
        st.last_served = now
        st.starved = False
        self._correct(st, request.num_output_tokens)

    def on_finish(self, request: Request) -> None:
        st = self._state.pop(request.request_id, None)
        if st is not None and request.status.value in ("stop", "length"):
            actual = max(request.num_output_tokens, 1)
            self.error_count += 1
            self.error_rel_sum += abs(st.initial - actual) / actual
            self.error_log2_sum += math.log2(max(st.initial, 1.0) / actual)
            self.predictor.observe(request.prompt_token_ids, request.num_output_tokens)

    def prediction_error(self) -> dict[str, float]:
        """Error of the arrival-time prediction over finished requests (see module doc)."""
        n = self.error_count
        return {
            "count": n,
            "mean_relative_error": self.error_rel_sum / n if n else 0.0,
            "mean_log2_error": self.error_log2_sum / n if n else 0.0,
        }

    def describe(self, request: Request) -> dict[str, Any]:
        st = self._state.get(request.request_id)
        return {} if st is None else {"predicted_output": st.predicted}

    def restore(self, request: Request, state: dict[str, Any], now: float) -> None:
        st = self._state.get(request.request_id)
        if st is not None and "predicted_output" in state:
            st.predicted = max(float(state["predicted_output"]), 1.0)
