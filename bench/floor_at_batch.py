"""The floor of a ``bench/gpu_serving.py`` run recomputed for an engine that decodes at
most ``--max-num-seqs`` requests at a time (CPU only: reads the run's JSON).

``gpu_serving``'s floor decodes every request of the workload in one batch from the first
iteration: with 1,000 requests and a batch limit of 256 that is not a schedule any engine
with that limit can run. Here requests take one of ``max_num_seqs`` decode slots in
arrival order (FCFS) and leave it after their output; each decode iteration reads the
weights plus the K/V of the requests in the slots, at the copy bandwidth the run measured;
prefill is the run's own prefill floor (matmul rate). The measured figure is not changed:
this only says how much of the gap to the run's floor a batch limit alone accounts for.

    python bench/floor_at_batch.py bench/results/gpu_serving_sharegpt_h200.json
"""

from __future__ import annotations

import argparse
import heapq
import json

import numpy as np


def decode_seconds(
    ins: list[int], outs: list[int], slots: int, cfg, bw: float
) -> tuple[float, int]:
    from bench import gpu_common as g

    kv_tok = g.kv_bytes_per_token(cfg)
    queue = list(range(len(ins)))
    running: list[tuple[int, int]] = []  # (iteration it leaves, index)
    ctx = np.zeros(len(ins), dtype=np.int64)
    total, it = 0.0, 0
    while queue or running:
        while queue and len(running) < slots:
            i = queue.pop(0)
            ctx[i] = ins[i] + 1  # the prefill produced the first token
            if outs[i] > 1:
                heapq.heappush(running, (it + outs[i] - 1, i))
        if not running:
            break
        live = [i for _, i in running]
        total += (g.weight_bytes(cfg, len(live)) + int(ctx[live].sum()) * kv_tok) / bw
        ctx[live] += 1
        it += 1
        while running and running[0][0] <= it:
            heapq.heappop(running)
    return total, it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("result", help="a gpu_serving JSON")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the run's")
    args = ap.parse_args()
    with open(args.result) as f:
        run = json.load(f)
    from bench import gpu_common as g
    from bench import gpu_serving as gs

    opts, floor = run["options"], run["floor"]
    slots = args.max_num_seqs or opts["max_num_seqs"]
    _, cfg = g.model_config(opts["model"], opts.get("layers"))
    wl = gs.make_workload(opts["workload"], opts["num_requests"], opts["seed"], opts["min_input"],
                          opts["max_input"], opts["output_len"], cfg.vocab_size)  # fmt: skip
    dec, iters = decode_seconds(wl.input_lens, wl.output_lens, slots, cfg,
                                floor["copy_bandwidth_Bps"])  # fmt: skip
    total = floor["prefill_s"] + dec
    tokens = floor["output_tokens"]
    got = next(r for k, r in run["results"].items() if k.startswith("tandem") and "makespan_s" in r)
    print(
        f"run floor: {floor['floor_s']:.2f} s ({floor['output_tokens_per_s']:.0f} tok/s), "
        f"decode {floor['decode_s']:.2f} s over {floor['decode_iterations']} iterations"
    )
    print(f"floor with {slots} decode slots: prefill {floor['prefill_s']:.2f} s + decode {dec:.2f} s "
          f"({iters} iterations) = {total:.2f} s, {tokens / total:.0f} tok/s")  # fmt: skip
    print(f"measured Tandem: {got['makespan_s']:.2f} s = {total / got['makespan_s']:.2f} of this "
          f"floor ({floor['floor_s'] / got['makespan_s']:.2f} of the run's)")  # fmt: skip


if __name__ == "__main__":
    main()
