"""What a worker service needs of an engine (pure: no torch).

``Engine`` is the surface ``WorkerService`` drives on its engine thread: ``LLMEngine``
(the model) and ``FakeEngine`` (``tandem.engine.fake``: no model, for the control plane)
both implement it. ``KVEngine`` adds what KV handoff and migration use: export, import and
detach of a request's blocks; only ``LLMEngine`` (and the kvtransfer test fakes) have it.

Contract, for every implementation:

- ``add_request`` validates (ids in the vocabulary, prompt + ``params.max_tokens`` within
  ``max_model_len`` and the KV pool) and raises ``ValueError`` on a refusal; the request
  runs with its ``priority`` in the scheduler's policy.
- ``step`` runs one iteration and returns one ``RequestOutput`` per request that made
  progress; a finished request's blocks are free before the next ``step``.
- ``abort_request`` returns the aborted request's last output, or None if unknown.
- ``scheduler`` exposes the counters the service's ``stats`` reads (``running``,
  ``waiting``, ``swapped``, ``device_kv``, ``swap``, ``num_preemptions``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tandem.config import EngineConfig, ModelConfig
    from tandem.engine.outputs import RequestOutput
    from tandem.request import Request, SamplingParams


@runtime_checkable
class Engine(Protocol):
    config: EngineConfig
    model_config: ModelConfig
    compat_hash: str
    num_iterations: int
    scheduler: Any

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> Request: ...

    def abort_request(self, request_id: str) -> RequestOutput | None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...


@runtime_checkable
class KVEngine(Engine, Protocol):
    """An ``Engine`` whose requests' KV can leave and join it (handoff, migration)."""

    def export_request(self, request_id: str) -> Any: ...

    def import_request(self, exported: Any) -> Request: ...

    def reserve_import(self, request_id: str, num_tokens: int) -> list[int]: ...

    def commit_import(
        self,
        request: Request,
        block_ids: list[int],
        payload: Any,
        num_computed_tokens: int,
        policy_state: dict[str, Any] | None = None,
    ) -> None: ...

    def abort_import(self, request_id: str) -> None: ...

    def gather_request_blocks(self, request_id: str, start: int, end: int) -> Any: ...

    def detach_request(self, request_id: str, from_block: int = 0) -> Any: ...

    def release_detached(self, detached: Any) -> None: ...

    def restore_detached(self, detached: Any) -> None: ...
