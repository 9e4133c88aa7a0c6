"""The fake engine implements the ``Engine`` protocol and runs a request to its end (pure)."""

from __future__ import annotations

from tandem.config import EngineConfig, ModelConfig
from tandem.engine.fake import FakeEngine
from tandem.engine.interface import Engine, KVEngine
from tandem.request import SamplingParams

MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=8,
                    intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                    rms_norm_eps=1e-5, max_position_embeddings=128)  # fmt: skip


def _engine() -> FakeEngine:
    return FakeEngine(EngineConfig(model="fake"), model_config=MODEL, token_table=[5, 6, 7])


def test_fake_engine_is_an_engine_but_moves_no_kv():
    engine = _engine()
    assert isinstance(engine, Engine)
    assert not isinstance(engine, KVEngine)


def test_priority_and_max_tokens_reach_the_request():
    engine = _engine()
    req = engine.add_request([1, 2], SamplingParams(max_tokens=3, ignore_eos=True), "r", 2)
    assert req.priority == 2 and req.sampling_params.max_tokens == 3
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert len(tokens) == 3
