"""Sampler semantics: greedy, penalties, min_tokens, top-k/p, min-p, seeds, logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from tandem.request import SamplingParams
from tandem.runner.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    sample_inverse_cdf,
    seeded_uniform,
)

EOS = 0


def make_row(
    params: SamplingParams,
    prompt: Sequence[int] = (5, 6, 7),
    output: Sequence[int] = (),
    eos: tuple[int, ...] = (EOS,),
) -> SamplingRow:
    return SamplingRow(
        params=params, prompt_token_ids=prompt, output_token_ids=output, eos_token_ids=eos
    )


def random_logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=generator) * 3.0


GREEDY = SamplingParams(temperature=0.0)


def test_greedy_is_argmax() -> None:
    logits = random_logits(8, 50)
    out = Sampler(seed=0)(logits, [make_row(GREEDY) for _ in range(8)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_fast_path_equals_slow_path() -> None:
    logits = random_logits(6, 40, seed=1)
    rows = [make_row(GREEDY) for _ in range(6)]
    fast = Sampler(seed=0)(logits, rows).token_ids
    slow = Sampler(seed=0)._sample(logits, rows).tolist()
    assert fast == slow == logits.argmax(dim=-1).tolist()
    # Greedy rows in a mixed batch (slow path) still take the argmax.
    mixed = rows[:3] + [make_row(SamplingParams(temperature=1.0))] + rows[3:5]
    mixed_logits = torch.cat([logits[:3], random_logits(1, 40, seed=2), logits[3:5]])
    tokens = Sampler(seed=0)(mixed_logits, mixed).token_ids
    assert tokens[:3] + tokens[4:] == fast[:5]


def test_empty_batch_and_shape_mismatch() -> None:
    assert Sampler()(torch.zeros(0, 10), []).token_ids == []
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 10), [make_row(GREEDY)])


def test_repetition_penalty_over_prompt_and_output() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 1.0]])
    row = make_row(SamplingParams(repetition_penalty=2.0), prompt=(0, 1), output=(2, 3, 3))
    got = apply_penalties(logits.clone(), [row])
    # Seen tokens 0..3: positive / 2, negative * 2 (however often seen); 4, 5 untouched.
    expected = torch.tensor([[1.0, -4.0, 1.5, -2.0, 0.5, 1.0]])
    torch.testing.assert_close(got, expected)


def test_presence_and_frequency_penalties_over_output_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    row = make_row(params, prompt=(0, 4), output=(1, 2, 2, 2))
    got = apply_penalties(logits.clone(), [row])
    # token 1: count 1 -> 1 - 0.5 - 0.25; token 2: count 3 -> 1 - 0.5 - 0.75; prompt-only ids free.
    expected = torch.tensor([[1.0, 0.25, -0.25, 1.0, 1.0]])
    torch.testing.assert_close(got, expected)


def test_penalties_per_row_in_a_batch() -> None:
    logits = torch.tensor([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    rows = [
        make_row(SamplingParams(frequency_penalty=1.0), prompt=(0,), output=(1, 1)),
        make_row(SamplingParams(repetition_penalty=4.0), prompt=(0,), output=()),
        make_row(
            SamplingParams(repetition_penalty=0.5, presence_penalty=-1.0), prompt=(9,), output=(2,)
        ),
    ]
    got = apply_penalties(logits.clone(), rows)
    expected = torch.tensor([[2.0, 0.0, 2.0], [0.5, 2.0, 2.0], [-1.0, -1.0, 0.5]])
    torch.testing.assert_close(got, expected)


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]])
    plain = make_row(GREEDY, prompt=(3,), output=(1,))
    penalised = make_row(
        SamplingParams(temperature=0.0, presence_penalty=0.5), prompt=(3,), output=(1,)
    )
    assert Sampler()(logits, [plain]).token_ids == [1]
    assert Sampler()(logits, [penalised]).token_ids == [2]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    # EOS is the best token, stop id 3 the second best, token 2 the third.
    logits = torch.tensor([[9.0, 0.0, 7.0, 8.0, 1.0]])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(3,))
    sampler = Sampler()
    for produced in range(3):
        row = make_row(params, output=[4] * produced)
        assert sampler(logits, [row]).token_ids == [2]
    assert sampler(logits, [make_row(params, output=[4, 4, 4])]).token_ids == [EOS]
    # With ignore_eos the EOS does not stop anything, so it is not held back; stop ids are.
    free_eos = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(3,), ignore_eos=True)
    assert sampler(logits, [make_row(free_eos)]).token_ids == [EOS]
    only_stop = torch.tensor([[0.0, 0.0, 7.0, 8.0, 1.0]])
    assert sampler(only_stop, [make_row(free_eos)]).token_ids == [2]


def test_min_tokens_never_samples_masked_tokens() -> None:
    logits = torch.zeros(2000, 6)
    params = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=(5,), seed=None)
    out = Sampler(seed=3)(logits, [make_row(params, eos=(0, 1)) for _ in range(2000)])
    assert set(out.token_ids) == {2, 3, 4}


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(64, 100, seed=4)
    rows = [make_row(SamplingParams(temperature=1.5, top_k=1)) for _ in range(64)]
    assert Sampler(seed=0)(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_equals_greedy() -> None:
    logits = random_logits(64, 100, seed=5)
    rows = [make_row(SamplingParams(temperature=1.0, top_p=1e-6)) for _ in range(64)]
    assert Sampler(seed=0)(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_top_k_and_top_p_helpers() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.2, 0.3, 0.4, 0.0]]))
    inf = float("-inf")
    kept_k = apply_top_k(logits, [2, None])
    assert torch.isfinite(kept_k[0]).tolist() == [True, True, False, False, False]
    torch.testing.assert_close(kept_k[1], logits[1])
    # Mass above: row 0 -> 0, .5, .7, .85, .95; p = .7 keeps the first two (reach .7).
    kept_p = apply_top_p(logits, 0.7)
    assert torch.isfinite(kept_p[0]).tolist() == [True, True, False, False, False]
    assert torch.isfinite(kept_p[1]).tolist() == [False, False, True, True, False]
    per_row = apply_top_p(logits, torch.tensor([[0.5], [1.0]]))
    assert torch.isfinite(per_row[0]).tolist() == [True, False, False, False, False]
    assert per_row[1].tolist()[:4] == logits[1].tolist()[:4] and per_row[1, 4] == inf


def test_min_p_helper_and_draws_stay_in_allowed_set() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.04, 0.01])
    logits = torch.log(probs).expand(4000, -1).contiguous()
    kept = apply_min_p(logits[:1].clone(), 0.3)  # threshold 0.12
    assert torch.isfinite(kept[0]).tolist() == [True, True, True, False, False, False]
    rows = [make_row(SamplingParams(temperature=1.0, min_p=0.3)) for _ in range(4000)]
    tokens = Sampler(seed=7)(logits, rows).token_ids
    assert set(tokens) == {0, 1, 2}


def _frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_sampling_matches_softmax(seeded: bool) -> None:
    draws, vocab, temperature = 20000, 8, 0.7
    logits = random_logits(1, vocab, seed=6).expand(draws, -1).contiguous() / 3.0
    if seeded:  # one seeded request per row: exercises the per-row CPU noise
        rows = [make_row(SamplingParams(temperature=temperature, seed=s)) for s in range(draws)]
    else:
        rows = [make_row(SamplingParams(temperature=temperature)) for _ in range(draws)]
    tokens = Sampler(seed=11)(logits, rows).token_ids
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert (_frequencies(tokens, vocab) - expected).abs().max() < 0.02


def test_top_k_top_p_distribution_with_mixed_rows() -> None:
    draws = 20000
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = torch.log(probs).expand(draws, -1).contiguous()
    # Row kinds alternate so the per-row (tensor) path of every filter is used.
    kinds = [
        SamplingParams(temperature=1.0, top_k=3, top_p=0.6),  # top-3 renormalised, then p
        SamplingParams(temperature=1.0, top_p=1.0),
    ]
    rows = [make_row(kinds[i % 2]) for i in range(draws)]
    tokens = Sampler(seed=12)(logits, rows).token_ids
    # Kind 0: after top-3, probs .444/.333/.222; mass above: 0, .444, .778 -> keeps {0, 1}.
    filtered = _frequencies(tokens[0::2], 4)
    torch.testing.assert_close(filtered, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=0.02, rtol=0)
    full = _frequencies(tokens[1::2], 4)
    torch.testing.assert_close(full, probs, atol=0.02, rtol=0)


def test_seeded_row_independent_of_batch() -> None:
    vocab = 1000
    target_logits = random_logits(1, vocab, seed=8) / 10.0  # flat: draws vary a lot
    target = make_row(SamplingParams(temperature=1.0, seed=42, top_p=0.95), output=[1] * 5)
    alone = Sampler(seed=0)(target_logits, [target]).token_ids[0]
    others = [
        make_row(SamplingParams(temperature=1.0)),
        make_row(SamplingParams(temperature=0.5, seed=7, top_k=50)),
        make_row(GREEDY),
        make_row(SamplingParams(temperature=1.3, repetition_penalty=1.2, min_p=0.01)),
    ]
    for position in range(len(others) + 1):
        rows = others[:position] + [target] + others[position:]
        logits = torch.cat(
            [
                random_logits(position, vocab, 9),
                target_logits,
                random_logits(4 - position, vocab, 10),
            ]
        )
        got = Sampler(seed=position + 100)(logits, rows).token_ids[position]
        assert got == alone


def test_seeded_row_randomness_depends_on_step() -> None:
    logits = torch.zeros(1, 1000)  # uniform: the token is the noise's argmax
    sampler = Sampler()
    params = SamplingParams(temperature=1.0, seed=3)
    tokens = [
        sampler(logits, [make_row(params, output=[1] * step)]).token_ids[0] for step in range(40)
    ]
    assert len(set(tokens)) > 30
    again = [
        sampler(logits, [make_row(params, output=[1] * step)]).token_ids[0] for step in range(40)
    ]
    assert tokens == again
    other_seed = SamplingParams(temperature=1.0, seed=4)
    assert sampler(logits, [make_row(other_seed)]).token_ids[0] != tokens[0] or (
        sampler(logits, [make_row(other_seed, output=[1])]).token_ids[0] != tokens[1]
    )
    uniforms = {seeded_uniform(3, step) for step in range(1000)}
    assert len(uniforms) == 1000 and all(0.0 <= u < 1.0 for u in uniforms)


def test_inverse_cdf_never_picks_a_token_without_mass() -> None:
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]]).expand(5, -1)
    uniforms = [0.0, 0.25 - 1e-12, 0.25, 1.0 - 2.0**-53, 1.0]  # 1.0: u * total == total
    assert sample_inverse_cdf(probs, uniforms).tolist() == [1, 1, 3, 3, 3]


def test_unseeded_rows_reproducible_with_sampler_seed() -> None:
    logits = torch.zeros(16, 1000)
    rows = [make_row(SamplingParams(temperature=1.0)) for _ in range(16)]
    assert Sampler(seed=5)(logits, rows).token_ids == Sampler(seed=5)(logits, rows).token_ids
    assert Sampler(seed=5)(logits, rows).token_ids != Sampler(seed=6)(logits, rows).token_ids


def test_logprobs_are_raw_log_softmax() -> None:
    logits = random_logits(4, 30, seed=13)
    rows = [
        make_row(SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5), output=(1,)),
        make_row(SamplingParams(temperature=0.0, logprobs=0)),
        make_row(SamplingParams(temperature=1.0)),
        make_row(SamplingParams(temperature=0.0, presence_penalty=1.0, logprobs=20), output=(2,)),
    ]
    out = Sampler(seed=0)(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i, n in [(0, 5), (1, 0), (3, 20)]:
        entry = out.logprobs[i]
        assert entry is not None
        sampled, top = entry
        assert sampled == pytest.approx(reference[i, out.token_ids[i]].item(), abs=1e-6)
        assert len(top) == n
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        expected = reference[i].topk(n) if n else None
        if expected is not None:
            assert [t for t, _ in top] == expected.indices.tolist()
            assert values == pytest.approx(expected.values.tolist(), abs=1e-6)
    assert out.logprobs[1] == (pytest.approx(reference[1].max().item(), abs=1e-6), [])


def test_input_logits_not_modified() -> None:
    logits = random_logits(5, 40, seed=14)
    before = logits.clone()
    rows = [
        make_row(SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, logprobs=3)),
        make_row(SamplingParams(temperature=0.0, repetition_penalty=1.3), output=(1, 2)),
        make_row(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(3,))),
        make_row(SamplingParams(temperature=1.0, frequency_penalty=0.5, seed=1), output=(4, 4)),
        make_row(GREEDY),
    ]
    Sampler(seed=0)(logits, rows)
    Sampler(seed=0)(logits, [make_row(GREEDY)] * 5)
    assert torch.equal(logits, before)


def test_logit_bias_changes_the_greedy_token() -> None:
    logits = random_logits(3, 50, seed=4)
    plain = Sampler()(logits, [make_row(SamplingParams(temperature=0.0))] * 3).token_ids
    target = [(t + 1) % 50 for t in plain]
    rows = [make_row(SamplingParams(temperature=0.0, logit_bias={t: 100.0})) for t in target]
    rows[2] = make_row(SamplingParams(temperature=0.0))  # an unbiased row in the same batch
    assert Sampler()(logits, rows).token_ids == [target[0], target[1], plain[2]]
    banned = make_row(SamplingParams(temperature=0.0, logit_bias={plain[0]: -100.0}))
    assert Sampler()(logits[:1], [banned]).token_ids != [plain[0]]


def test_logit_bias_applies_to_sampled_rows_and_skips_ids_past_the_vocabulary() -> None:
    logits = torch.zeros(1, 8)
    row = make_row(SamplingParams(temperature=1.0, seed=3, logit_bias={5: 100.0, 99: -50.0}))
    assert all(Sampler()(logits, [row]).token_ids == [5] for _ in range(5))
    assert torch.equal(logits, torch.zeros(1, 8))  # the caller's logits are untouched


def test_logit_bias_validation_and_wire_round_trip() -> None:
    from tandem.protocol import params_from_wire, params_to_wire

    p = SamplingParams(logit_bias={9: -1.5, 2: 3})
    assert p.logit_bias == ((2, 3), (9, -1.5))
    assert params_from_wire(params_to_wire(p)) == p
    for bad in ({-1: 1.0}, {1: 101.0}, {1: float("nan")}, [(1, 1.0), (1, 2.0)]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
