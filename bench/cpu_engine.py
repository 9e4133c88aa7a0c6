"""Tokens/s of Tandem's engine against transformers ``generate`` on the same prompts.

All three run in this one process, one after another, on the same prompts and the same
weights, greedy, with a fixed number of new tokens per prompt (EOS ignored):

- tandem:        all prompts submitted together (continuous batching, chunked prefill)
- hf-sequential: transformers ``generate`` on each prompt alone
- hf-batched:    transformers ``generate`` on all prompts at once, left-padded

It also checks that tandem's tokens equal hf-sequential's (they must: greedy parity).

    python bench/cpu_engine.py                       # bundled tiny model
    python bench/cpu_engine.py --model DIR --num-prompts 32 --output-len 128
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model folder (default: bundled tiny llama)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--min-input-len", type=int, default=16)
    ap.add_argument("--max-input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from tandem import LLM, SamplingParams

    # No prefix caching: the warm-up's prompts must not be served from the cache in the run.
    llm = LLM(
        model=args.model,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    model_dir = llm.config.model
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(
        args.min_input_len, args.max_input_len + 1, (args.num_prompts,), generator=g
    ).tolist()
    prompts = [torch.randint(8, vocab, (n,), generator=g).tolist() for n in lens]
    total_new = args.num_prompts * args.output_len
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    llm.generate(
        prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    )  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    t_tandem = time.perf_counter() - t0

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = dict(
        max_new_tokens=args.output_len,
        min_new_tokens=args.output_len,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.no_grad():
        hf.generate(
            torch.tensor([prompts[0]]), **{**gen, "max_new_tokens": 4, "min_new_tokens": 4}
        )  # warm-up
        t0 = time.perf_counter()
        seq_tokens = [hf.generate(torch.tensor([p]), **gen)[0, len(p) :].tolist() for p in prompts]
        t_seq = time.perf_counter() - t0

        width = max(lens)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, **gen)
        t_batch = time.perf_counter() - t0

    same = sum(o.token_ids == s for o, s in zip(outs, seq_tokens, strict=True))
    print(
        f"model={model_dir} prompts={args.num_prompts} input_len={args.min_input_len}..{args.max_input_len} "
        f"output_len={args.output_len} threads={torch.get_num_threads()}"
    )
    print(f"greedy outputs identical to hf-sequential: {same}/{len(prompts)}")
    print(f"{'system':<15}{'seconds':>10}{'output tok/s':>15}{'tandem speed-up':>17}")
    for name, t in (("tandem", t_tandem), ("hf-sequential", t_seq), ("hf-batched", t_batch)):
        print(f"{name:<15}{t:>10.2f}{total_new / t:>15.1f}{t / t_tandem:>16.2f}x")


if __name__ == "__main__":
    main()
