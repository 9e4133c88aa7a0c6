"""ALISE-style speculative priority: shortest estimated remaining time first.

    remaining(r) = prefill_time(uncomputed prompt tokens)
                 + max(predicted_output - generated, 1) · decode_step_time

``predicted_output`` comes from ``OutputLengthPredictor`` (kNN over the prompt, learned
online from finished requests). A request that outlives its prediction has the
prediction multiplied by ``growth`` (default 2) until it exceeds what it has generated:
a misprediction costs a bounded number of re-rankings instead of starving it. Requests
not served for ``starvation_limit`` seconds jump ahead of all non-starved ones (the same
guard as mlfq). ``sort_key = (priority class, not starved, remaining, arrival order)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


class ALISEPolicy(SchedulingPolicy):
    name = "alise"

    def __init__(
        self,
        cost_model: CostModel | None = None,
        predictor: OutputLengthPredictor | None = None,
        starvation_limit: float = 60.0,
        growth: float = 2.0,
        **_: Any,
    ) -> None:
        if starvation_limit <= 0 or growth <= 1.0:
            raise ValueError("alise needs starvation_limit > 0 and growth > 1")
        self.cost = cost_model or CostModel()
        self.predictor = predictor or OutputLengthPredictor()
        self.starvation_limit = starvation_limit
        self.growth = growth
        self._state: dict[str, _AliseState] = {}
        self._order = itertools.count()
        self.promotions = 0

    def on_arrival(self, request: Request, now: float) -> None:
        if request.request_id not in self._state:
            predicted = self.predictor.predict(request.prompt_token_ids)
            self._state[request.request_id] = _AliseState(predicted, next(self._order), now)

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
        while request.num_output_tokens >= st.predicted:
            st.predicted *= self.growth

    def on_finish(self, request: Request) -> None:
        st = self._state.pop(request.request_id, None)
        if st is not None and request.status.value in ("stop", "length"):
            self.predictor.observe(request.prompt_token_ids, request.num_output_tokens)

    def describe(self, request: Request) -> dict[str, Any]:
        st = self._state.get(request.request_id)
        return {} if st is None else {"predicted_output": st.predicted}

    def restore(self, request: Request, state: dict[str, Any], now: float) -> None:
        st = self._state.get(request.request_id)
        if st is not None and "predicted_output" in state:
            st.predicted = max(float(state["predicted_output"]), 1.0)
