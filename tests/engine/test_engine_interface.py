"""``LLMEngine`` implements the ``Engine`` and ``KVEngine`` protocols that workers drive."""

from __future__ import annotations

from tandem.config import CacheConfig, EngineConfig
from tandem.engine.interface import Engine, KVEngine
from tandem.engine.llm_engine import LLMEngine


def test_llm_engine_is_a_kv_engine(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), cache=CacheConfig(num_blocks=32)))
    assert isinstance(engine, Engine) and isinstance(engine, KVEngine)
