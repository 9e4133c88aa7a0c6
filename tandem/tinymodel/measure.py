"""Measure how peaked the tiny models' greedy decoding is (see ``build`` for why it matters).

``greedy_gap_stats`` runs transformers' own greedy ``generate`` in float32 and reports the
top-1 minus top-2 logit gap at every generated step, how far float32 is from float64 on that
gap along the same tokens (a stand-in for the noise between two float32 implementations), and
how varied the generated tokens are. ``python -m tandem.tinymodel.measure [ARCH ...]`` prints
the numbers for the standard 16 prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.tinymodel import ARCHS
from tandem.tinymodel import tokenizer as tk
from tandem.tinymodel.build import make_tiny_model, quiet_progress


@dataclass(frozen=True)
class GapStats:
    """Greedy-decoding margins of one model over all prompts and steps."""

    steps: int
    min_gap: float  # raw top-1 minus top-2 logit, smallest over all steps
    p1_gap: float  # 1st percentile of the gap
    median_gap: float
    logit_std: float  # mean over steps of the logits' std across the vocabulary
    max_gap_err: float  # largest |gap(float32) - gap(float64)| on the same two tokens
    min_gap_over_err: float  # smallest per-step ratio gap / that error
    distinct_tokens: int  # distinct generated ids over all prompts
    min_distinct_per_prompt: int  # fewest distinct ids in one prompt's continuation
    distinct_continuations: int  # number of different continuations among the prompts


def sample_prompts(num: int = 16, max_len: int = 500, seed: int = 0) -> list[list[int]]:
    """``num`` prompts of token ids with lengths spread log-uniformly over 1..``max_len``.

    Even-indexed prompts are ``<s>`` followed by generated corpus text; odd-indexed ones are
    uniform random non-special ids. Deterministic in the arguments.
    """
    from tandem.tinymodel.corpus import make_corpus

    gen = torch.Generator().manual_seed(seed)
    text = "\n".join(make_corpus(200, seed=seed + 1))
    text_ids = tk.train_tokenizer().encode(text, add_special_tokens=False).ids
    prompts: list[list[int]] = []
    for i in range(num):
        n = max(1, round(max_len ** (i / max(1, num - 1))))
        if i % 2 == 0:
            start = int(torch.randint(0, len(text_ids) - max_len, (1,), generator=gen))
            prompts.append([tk.BOS_ID, *text_ids[start : start + n - 1]])
        else:
            ids = torch.randint(len(tk.SPECIAL_TOKENS), tk.VOCAB_SIZE, (n,), generator=gen)
            prompts.append(ids.tolist())
    return prompts


def greedy_gap_stats(
    model_dir: str | Path, prompts: list[list[int]], new_tokens: int = 64
) -> GapStats:
    """Greedy-generate ``new_tokens`` ids for each prompt (one at a time, EOS ignored) with
    transformers in float32 and summarise the logit gaps; see ``GapStats``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    gcfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=tk.PAD_ID,
        output_logits=True,
        return_dict_in_generate=True,
    )
    gaps, errs, stds, outs = [], [], [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            res = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gcfg)
            logits = torch.cat(res.logits).double()  # [new_tokens, vocab]
            new = res.sequences[0, len(ids) :]
            # float64 logits at the same steps, from one full forward over prompt + output.
            full = torch.cat([x[0], new[:-1]])[None]
            ref_logits = ref(full).logits[0, len(ids) - 1 :]  # [new_tokens, vocab]
            top2 = logits.topk(2, dim=-1).indices  # [new_tokens, 2]
            gap = logits.gather(1, top2) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
            ref_gap = ref_logits.gather(1, top2) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
            gaps.append(gap)
            errs.append((gap - ref_gap).abs())
            stds.append(logits.std(dim=-1))
            outs.append(tuple(new.tolist()))
    g, e = torch.cat(gaps), torch.cat(errs)
    return GapStats(
        steps=g.numel(),
        min_gap=float(g.min()),
        p1_gap=float(torch.quantile(g, 0.01)),
        median_gap=float(g.median()),
        logit_std=float(torch.cat(stds).mean()),
        max_gap_err=float(e.max()),
        min_gap_over_err=float((g / e.clamp_min(1e-30)).min()),
        distinct_tokens=len({t for o in outs for t in o}),
        min_distinct_per_prompt=min(len(set(o)) for o in outs),
        distinct_continuations=len(set(outs)),
    )


def main(archs: list[str]) -> None:
    """Print ``GapStats`` for each arch (seed 0) on the standard 16 prompts, 64 new tokens."""
    import tempfile

    torch.set_num_threads(1)  # tiny ops: more threads only add barrier waits
    prompts = sample_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs or ARCHS:
            stats = greedy_gap_stats(make_tiny_model(Path(tmp) / arch, arch), prompts)
            print(arch, stats, flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
