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


def test_token_slice_shows_a_pending_token_as_a_placeholder():
    from tandem.request import PLACEHOLDER_TOKEN

    req = Request("r", [7, 8, 9], SamplingParams(max_tokens=3), 0.0)
    req.output_token_ids.append(4)
    req.num_pending_tokens = 1  # sampled on the device, not read yet
    assert req.num_tokens == 5 and req.all_token_ids == [7, 8, 9, 4]
    assert req.token_slice(4, 5) == [PLACEHOLDER_TOKEN]
    assert req.token_slice(2, 9) == [9, 4, PLACEHOLDER_TOKEN]
    assert not req.awaits_last_token
    assert req.append_output(6) is None and req.num_pending_tokens == 0
    req.num_pending_tokens = 1
    assert req.awaits_last_token  # 2 known + 1 pending = max_tokens
