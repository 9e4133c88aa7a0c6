"""Request bookkeeping that the scheduler's hot path relies on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tandem.request import Request, SamplingParams


@given(
    prompt=st.lists(st.integers(0, 99), min_size=1, max_size=12),
    output=st.lists(st.integers(0, 99), max_size=12),
    a=st.integers(0, 30),
    b=st.integers(0, 30),
)
def test_token_slice_equals_slicing_all_token_ids(prompt, output, a, b):
    req = Request("r", prompt, SamplingParams(max_tokens=16), 0.0)
    req.output_token_ids.extend(output)
    start, end = min(a, b), max(a, b)
    assert req.token_slice(start, end) == req.all_token_ids[start:end]
