"""loadgen.tokens and loadgen.dataset: exact prompt lengths, reproducible jobs, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loadgen.dataset import DatasetError, load_jobs
from loadgen.tokens import PromptTokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return PromptTokenizer(tiny_llama_dir)


def test_prompts_have_exactly_the_asked_token_count(tok):
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 300):
        text, real = tok.text_of_length(rng, n)
        assert real == n == len(tok.encode(text))


def test_special_tokens_are_never_sampled(tok, tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    special = {int(k) for k in config.get("added_tokens_decoder", {})}
    assert special and not special & set(tok.usable_ids.tolist())


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        PromptTokenizer(tmp_path)


@pytest.mark.parametrize("workload", ["random", "sharegpt-like", "alpaca-like"])
def test_synthetic_jobs_are_reproducible(tok, workload):
    kw = dict(workload=workload, num_requests=20, input_len=40, output_len=10, range_ratio=0.5)
    a = load_jobs(tok, seed=1, **kw)
    assert a == load_jobs(tok, seed=1, **kw)
    assert a != load_jobs(tok, seed=2, **kw)
    assert all(j.prompt_len == len(tok.encode(j.prompt)) for j in a)
    if workload == "random":
        assert all(20 <= j.prompt_len <= 60 and 5 <= j.output_len <= 15 for j in a)


def test_sharegpt_file(tok, tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hello there"},
                           {"from": "gpt", "value": "general kenobi, you are a bold one"}]},
        {"conversations": [{"from": "human", "value": "no reply"}]},
    ]))  # fmt: skip
    jobs = load_jobs(tok, workload="random", num_requests=3, seed=0, dataset_path=str(path))
    assert [j.prompt for j in jobs] == ["hello there"] * 3  # cycled; the one without reply skipped
    assert jobs[0].output_len == len(tok.encode("general kenobi, you are a bold one"))


def test_trace_rows_timestamps_and_priorities(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"prompt": "abc def", "output_len": 4, "timestamp": 10.5, "priority": 1}\n'
        '\n{"prompt_len": 12, "output_len": 2, "timestamp": 12.0}\n'
    )
    jobs = load_jobs(tok, workload="random", num_requests=1, seed=0, dataset_path=str(path))
    assert [j.timestamp for j in jobs] == [0.0, 1.5]
    assert [j.priority for j in jobs] == [1, None]
    assert jobs[1].prompt_len == 12 and jobs[0].output_len == 4


@pytest.mark.parametrize(
    "line, message",
    [('{"prompt_len": 3}', "output_len"), ('{"output_len": 3}', "prompt_len"),
     ('{"prompt_len": 3, "output_len": 0}', ">= 1"), ("not json", "line 1")],
)  # fmt: skip
def test_bad_trace_rows_name_the_line(tok, tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError, match=message):
        load_jobs(tok, workload="random", num_requests=1, seed=0, dataset_path=str(path))
