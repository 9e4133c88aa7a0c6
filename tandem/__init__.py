"""Tandem: LLM serving with low job completion time.

The offline API is ``from tandem import LLM, SamplingParams``. ``LLM`` pulls in torch,
so it is imported lazily: pure modules (router, scheduler, registry) can import
``tandem.*`` without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tandem.request import RequestStatus, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "RequestStatus", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from tandem.engine.llm import LLM
    from tandem.engine.outputs import RequestOutput


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from tandem.engine.llm import LLM

        return LLM
    if name == "RequestOutput":
        from tandem.engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
