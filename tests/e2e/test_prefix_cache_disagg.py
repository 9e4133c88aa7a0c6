"""Prefix caching in disaggregated mode, as real processes (`tandem serve
--prefill-workers 1 --decode-workers 1`, tcp KV transfer): a repeated prompt is prefilled
only past its cached prefix on the prefill worker, and its handoff moves only the blocks
the decode worker does not hold already; the answers equal the offline API's."""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tests.e2e.servers import serve
from tests.e2e.test_prefix_cache_serve import PROMPT, _generate, _total, _wait_for


@pytest.fixture(scope="module")
def want(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    return lambda ids: llm.generate([ids], greedy)[0].token_ids


def test_repeated_prompt_skips_prefill_and_transfer_of_cached_blocks(tiny_llama_dir, want):
    flags = ("--prefill-workers", "1", "--decode-workers", "1", "--policy", "fcfs")
    with serve(tiny_llama_dir, *flags, timeout=180, workers=2) as url:
        first = _generate(url, PROMPT)
        m = _wait_for(url, "tandem_worker_kv_received_total", 1)
        assert _total(m, "tandem_worker_kv_received_skipped_blocks_total") == 0
        second = _generate(url, PROMPT)
        other = PROMPT[:70] + [9, 8, 7, 6]
        third = _generate(url, other)
        assert first == second == want(PROMPT) and third == want(other)
        m = _wait_for(url, "tandem_worker_kv_received_total", 3)
        assert _total(m, "tandem_worker_kv_received_total") == 3
        # The decode worker held the 6 full prompt blocks of the first request (imported,
        # then named), and 4 of them are also the 70-token prefix of the third.
        assert _total(m, "tandem_worker_kv_received_skipped_blocks_total") == 6 + 4
        # The prefill worker computed the repeated prompt only past its cached blocks.
        hits = {k: v for k, v in m.items() if "prefix_cache_hit_tokens_total" in k and v}
        assert list(hits.values()) == [96 + 64], hits
        label = next(iter(hits)).split("{", 1)[1]
        assert m["tandem_worker_kv_handoffs_total{" + label] == 3  # the prefill worker
