"""Shared helpers for engine-vs-transformers parity tests.

``reference_greedy`` runs transformers' greedy ``generate`` on one prompt alone and keeps
the logits of every step, so that a mismatch can be judged: it is forgiven only where
the reference's own top-two logits are within ``NEAR_TIE`` of each other (a float32
rounding difference may then legitimately flip the argmax) and the engine chose one of
those two. Everything after a forgiven divergence is not compared (the contexts differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEAR_TIE = 1e-3  # absolute logit gap; float32 noise between implementations is ~1e-5


@dataclass
class Reference:
    tokens: list[int]
    logits: list[torch.Tensor]  # per generated position: [vocab]


def reference_greedy(
    model, prompt: list[int], max_new_tokens: int, device: str = "cpu"
) -> Reference:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return Reference(tokens, [lg[0].cpu() for lg in out.logits])


def compare(ref: Reference, got: list[int]) -> tuple[bool, str]:
    """True if identical, or identical up to a proven near-tie. Explains a failure."""
    for i, (a, b) in enumerate(zip(ref.tokens, got, strict=False)):
        if a == b:
            continue
        logits = ref.logits[i]
        top2 = torch.topk(logits, 2)
        gap = float(top2.values[0] - top2.values[1])
        if gap < NEAR_TIE and b in top2.indices.tolist():
            return True, f"forgiven near-tie at step {i} (gap {gap:.2e})"
        return (
            False,
            f"diverged at step {i}: reference {a}, engine {b}, reference top-2 gap {gap:.3e}",
        )
    if len(ref.tokens) != len(got):
        return False, f"length differs: reference {len(ref.tokens)}, engine {len(got)}"
    return True, "identical"


def mixed_prompts(
    vocab_size: int, n: int = 16, seed: int = 0, max_len: int = 500
) -> list[list[int]]:
    """``n`` prompts of token ids with lengths spread from 1 to ``max_len``."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, max_len] + torch.randint(2, max_len, (n - 2,), generator=g).tolist()
    # Avoid the special ids at the start of the vocabulary so prompts look like text.
    return [torch.randint(8, vocab_size, (length,), generator=g).tolist() for length in lengths]
