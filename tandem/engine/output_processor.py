"""Token events → ``RequestOutput``: incremental detokenization and stop strings.

Stop strings need text, so they are checked here rather than in the scheduler; a hit
finishes the request in the scheduler within the same step, so its blocks are freed
before the next iteration is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tandem.engine.outputs import RequestOutput
from tandem.request import Request, RequestStatus
from tandem.sched.scheduler import TokenEvent

if TYPE_CHECKING:
    from tandem.detokenizer import IncrementalDetokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Any | None, finish: Callable[[str, RequestStatus], Any]) -> None:
        self.tokenizer = tokenizer
        self._finish = finish
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._text: dict[str, str] = {}
        self._special_ids: frozenset[int] | None = None
        if tokenizer is not None:
            from tandem.detokenizer import special_token_ids

            self._special_ids = frozenset(special_token_ids(tokenizer))

    def add(self, request: Request, context_token_ids: list[int] | None = None) -> None:
        """Start tracking ``request``. ``context_token_ids`` seeds detokenization of a
        request that arrives with output already generated (import / migration)."""
        self._text[request.request_id] = ""
        if self.tokenizer is None:
            return
        from tandem.detokenizer import IncrementalDetokenizer

        params = request.sampling_params
        self._detok[request.request_id] = IncrementalDetokenizer(
            self.tokenizer,
            context_token_ids if context_token_ids is not None else request.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            special_ids=self._special_ids,
        )

    def process(self, events: list[TokenEvent]) -> list[RequestOutput]:
        outputs = []
        for ev in events:
            req = ev.request
            rid = req.request_id
            delta = ""
            finished = ev.finished
            detok = self._detok.get(rid)
            if detok is not None:
                update = detok.add_tokens([ev.token_id])
                delta = update.delta
                if update.stop_string is not None and not finished:
                    self._finish(rid, RequestStatus.FINISHED_STOPPED)
                    req.stop_reason = update.stop_string
                    finished = True
                elif update.stop_string is not None:
                    # The last allowed token also completed a stop string: the text is cut
                    # there, so the reason reported is the stop string (as vLLM does).
                    req.stop_reason = update.stop_string
                    req.status = RequestStatus.FINISHED_STOPPED
                if finished and update.stop_string is None:
                    delta += detok.flush()
            self._text[rid] = self._text.get(rid, "") + delta
            outputs.append(self._output(req, [ev.token_id], delta, finished))
        return outputs

    def forget(self, request_id: str) -> None:
        """Stop tracking a request that left this engine."""
        self._detok.pop(request_id, None)
        self._text.pop(request_id, None)

    def export_state(self, request_id: str) -> tuple[Any, str]:
        """Hand over a request's detokenizer (with any held-back text) and its text so far.

        Moving the detokenizer itself keeps the stream exact across engines: text held back
        for a partial character or a possible stop string is neither lost nor repeated.
        """
        state = (self._detok.pop(request_id, None), self._text.pop(request_id, ""))
        return state

    def import_state(self, request: Request, state: tuple[Any, str] | None) -> None:
        """Track an imported request, continuing its detokenizer if one came with it."""
        if state is None or state[0] is None:
            self.add(request, context_token_ids=request.all_token_ids)
            return
        self._detok[request.request_id], self._text[request.request_id] = state

    def abort(self, request: Request) -> RequestOutput:
        return self._output(request, [], "", True)

    def _output(
        self, req: Request, new_ids: list[int], delta: str, finished: bool
    ) -> RequestOutput:
        rid = req.request_id
        out = RequestOutput(
            request_id=rid,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=self._text.get(rid, ""),
            new_token_ids=new_ids,
            delta_text=delta,
            finished=finished,
            finish_reason=req.status.finish_reason if finished else None,
            stop_reason=req.stop_reason,
            logprobs=list(req.output_logprobs)
            if req.sampling_params.logprobs is not None
            else None,
            num_preemptions=req.num_preemptions,
            num_cached_tokens=req.num_cached_tokens,
        )
        if finished:
            self._detok.pop(rid, None)
            self._text.pop(rid, None)
        return out
