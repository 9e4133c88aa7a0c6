"""A ``random:NAME`` model end to end on CPU: weights drawn on load, seeded."""

from __future__ import annotations

import pytest

from tandem.engine.llm import LLM
from tandem.request import SamplingParams


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))


def test_random_model_generates_the_same_tokens_twice(cache):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(model="random:llama-3-debug", policy="fcfs")
        out = llm.generate(["hello world", "a much longer prompt than the first one"], params)
        runs.append([o.token_ids for o in out])
    assert runs[0] == runs[1]
    assert all(len(ids) == 6 for ids in runs[0])
    # ids above the tiny tokenizer's 2048 decode to padding tokens, not errors
    assert max(max(ids) for ids in runs[0]) < 128256
