"""Accuracy cost of int8 compression of swapped KV blocks (``--swap-int8``, ALISE).

For each prompt the engine's own runner prefills it, then decodes greedily with exact KV:
that is the reference (tokens and logits of every step). The same prompt is then run
again with its KV blocks sent to the host tier and back through the real swap path
(``KVSwapper``: offload, then prefetch into the same blocks) at some points:

- ``swap once``: every block after the prefill (a request preempted right after it);
- ``swap every 8``: every block, after the prefill and after every 8th decode step
  (a request that keeps being preempted; errors compound).

Each variant is measured two ways: teacher-forced (fed the reference tokens, so the
logits compare position by position: max and mean absolute logit error, argmax
agreement) and free-running (greedy on its own: share of output positions equal to the
reference, and how many prompts match it entirely). A dense (non-int8) host tier is run
the same way as a control: its error must be exactly 0.

    python bench/offload_int8_accuracy.py                  # bundled tiny llama, CPU
    python bench/offload_int8_accuracy.py --model DIR --num-prompts 32 --new-tokens 128
"""

from __future__ import annotations

import argparse
import random

import torch

from tandem.config import CacheConfig, EngineConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.runner.inputs import prepare_inputs
from tandem.sched.output import BlockCopy, ScheduledChunk, SchedulerOutput

BLOCK = 16


class Harness:
    """One engine's runner driven by hand: a single request in blocks 0..k-1."""

    def __init__(self, model: str | None, int8: bool, device: str, max_len: int) -> None:
        from tandem.engine.llm import build_engine_config

        base = build_engine_config(model=model, device=device, kv_blocks=8)
        blocks = -(-max_len // BLOCK)
        config = EngineConfig(
            model=base.model,
            device=device,
            cache=CacheConfig(
                block_size=BLOCK, num_blocks=blocks, num_host_blocks=blocks, swap_int8=int8
            ),
            scheduler=SchedulerConfig(policy="fcfs"),
        )
        self.engine = LLMEngine(config)
        self.runner = self.engine.runner
        self.vocab = self.engine.model_config.vocab_size

    @torch.inference_mode()
    def logits(self, tokens: list[int], start: int) -> torch.Tensor:
        """Forward ``tokens`` at positions ``start..``; logits of the last one [vocab]."""
        end = start + len(tokens)
        table = list(range(-(-end // BLOCK)))
        chunk = ScheduledChunk(None, tokens, start, table, True)  # type: ignore[arg-type]
        r = self.runner
        inputs = prepare_inputs(
            SchedulerOutput(chunks=[chunk]), BLOCK, r.model_config.sliding_window, r.device
        )
        hidden = r.model(inputs.input_ids, inputs.positions, r.kv.layers(), inputs.meta, r.backend)
        return r.model.compute_logits(hidden[inputs.sample_rows])[0].float().cpu()

    def swap_round_trip(self, num_tokens: int) -> None:
        """Every block holding the first ``num_tokens`` tokens: to the host tier and back."""
        ids = tuple(range(-(-num_tokens // BLOCK)))
        swapper = self.runner.swapper
        swapper.run(SchedulerOutput(offload=[BlockCopy("device", ids, ids)]))
        swapper.run(SchedulerOutput(prefetch=[BlockCopy("host", ids, ids)]))
        swapper.wait_all()

    def run(
        self, prompt: list[int], new_tokens: int, swap_every: int | None, forced: list[int] | None
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy decode (or teacher-forced on ``forced``); round-trips the KV after the
        prefill and every ``swap_every`` steps when given. Returns (tokens, logits)."""
        out, all_logits = [], []
        logits = self.logits(prompt, 0)
        pos = len(prompt)
        for step in range(new_tokens):
            all_logits.append(logits)
            tok = forced[step] if forced is not None else int(logits.argmax())
            out.append(tok)
            if step == new_tokens - 1:
                break
            if swap_every is not None and step % swap_every == 0:
                self.swap_round_trip(pos)
            logits = self.logits([tok], pos)
            pos += 1
        return out, all_logits


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model folder (default: bundled tiny llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-input-len", type=int, default=16)
    ap.add_argument("--max-input-len", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    max_len = args.max_input_len + args.new_tokens
    dense = Harness(args.model, False, args.device, max_len)
    int8 = Harness(args.model, True, args.device, max_len)
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(8, dense.vocab) for _ in range(rng.randint(args.min_input_len, args.max_input_len))]
        for _ in range(args.num_prompts)
    ]  # fmt: skip
    refs = [dense.run(p, args.new_tokens, None, None) for p in prompts]
    ref_scale = max(float(lg.abs().max()) for _, lgs in refs for lg in lgs)

    # swap_every: None = never; the prefill round trip happens at step 0 (after prefill).
    variants = [
        ("dense swap every 8 (control)", dense, 8),
        ("int8 swap once", int8, args.new_tokens + 1),
        ("int8 swap every 8", int8, 8),
    ]
    rows = []
    for name, h, every in variants:
        max_err, sum_err, n_err, tf_agree, fr_agree, fr_exact = 0.0, 0.0, 0, 0, 0, 0
        for p, (ref_tokens, ref_logits) in zip(prompts, refs, strict=True):
            _, logits = h.run(p, args.new_tokens, every, ref_tokens)
            for a, b in zip(logits, ref_logits, strict=True):
                d = (a - b).abs()
                max_err = max(max_err, float(d.max()))
                sum_err += float(d.mean())
                n_err += 1
                tf_agree += int(a.argmax()) == int(b.argmax())
            free, _ = h.run(p, args.new_tokens, every, None)
            same = sum(x == y for x, y in zip(free, ref_tokens, strict=True))
            fr_agree += same
            fr_exact += same == len(ref_tokens)
        total = len(prompts) * args.new_tokens
        rows.append((name, max_err, sum_err / n_err, tf_agree / total, fr_agree / total, fr_exact))

    print(
        f"{len(prompts)} prompts of {args.min_input_len}-{args.max_input_len} tokens, "
        f"{args.new_tokens} greedy tokens each; block size {BLOCK}; "
        f"max |logit| of the reference {ref_scale:.2f}"
    )
    print(
        "| variant | max abs logit error | mean abs logit error | argmax agreement "
        "(teacher-forced) | greedy token agreement | prompts identical |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, mx, mean, tf, fr, exact in rows:
        print(f"| {name} | {mx:.4f} | {mean:.5f} | {tf:.4f} | {fr:.4f} | {exact}/{len(prompts)} |")


if __name__ == "__main__":
    main()
