"""The scheduler alone (no model, no copies) on bench/gpu_offload.py's overload: swap vs
recompute preemption, to separate scheduling effects from the cost of executing them.

Same burst as the GPU run (128 requests, 128–1024 prompt tokens, 64–256 output tokens,
512 device blocks of 16 tokens, batch <= 64, budget 2048, host tier 16,384 blocks); each
iteration's sampled tokens come from a fake runner. Prints iterations, tokens processed,
decode chunks per iteration, iterations that swapped in / out, preemptions, wall time.

    python bench/offload_sched_sim.py [fcfs|mlfq|alise]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.config import CacheConfig, SchedulerConfig  # noqa: E402
from tandem.request import Request, SamplingParams  # noqa: E402
from tandem.sched.cost_model import CostModel  # noqa: E402
from tandem.sched.policy import make_policy  # noqa: E402
from tandem.sched.scheduler import Scheduler  # noqa: E402
from tests.unit.sched.test_scheduler_properties import _fake_run  # noqa: E402


def run(mode: str, policy: str, n: int = 128) -> None:
    rng = random.Random(0)
    s = Scheduler(
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, preemption_mode=mode),
        # Every prompt is [5] * n: without caching off, they would all share one prefix.
        CacheConfig(
            block_size=16,
            num_blocks=512,
            num_host_blocks=16384 if mode == "swap" else 0,
            enable_prefix_caching=False,
        ),  # fmt: skip
        policy=make_policy(policy, cost_model=CostModel()),
        clock=lambda: 0.0,
    )
    for i in range(n):
        prompt = [5] * rng.randint(128, 1024)
        params = SamplingParams(max_tokens=rng.randint(64, 256), ignore_eos=True)
        s.add_request(Request(f"r{i}", prompt, params, arrival_time=0.0))
    t0, it, tokens, decodes, ins, outs = time.perf_counter(), 0, 0, 0, 0, 0
    while s.requests:
        out = s.schedule()
        it += 1
        tokens += out.num_batched_tokens
        decodes += sum(1 for c in out.chunks if c.num_tokens == 1)
        ins += out.swaps_in
        outs += out.swaps_out
        s.update_from_output(out, _fake_run(out), seconds=0.01)
    print(f"{mode:<10} {policy:<6} iterations {it:>5}  tokens {tokens:>7}  decodes/iter "
          f"{decodes / it:5.1f}  swap-in iters {ins:>4}  swap-out iters {outs:>4}  "
          f"preemptions {s.num_preemptions:>5}  wall {time.perf_counter() - t0:.2f} s")  # fmt: skip


if __name__ == "__main__":
    for policy in sys.argv[1:] or ["fcfs", "mlfq"]:
        for mode in ("swap", "recompute"):
            run(mode, policy)
