"""A fake runner that keeps fake K/V in fake blocks, so scheduler tests can check what
every request reads (pure Python, no torch).

The "K/V" of position ``p`` is ``kv(p) = H(kv(p - 1), token p)``: like a real model, it
depends on the whole prefix, and it is computed from what the runner READS back from the
blocks for position ``p - 1``. A request that resumes on a wrong or overwritten block
(a bad prefix hit, an eviction under a reader, a swap into the wrong blocks) therefore
reads a value that differs from the one its tokens imply, and ``run`` fails at once.
The sampled token is a function of ``kv`` of the last position only, so the outputs of
a correct scheduler do not depend on caching, preemption or swapping.
"""

from __future__ import annotations

import hashlib

from tandem.sched.output import RunnerOutput, SchedulerOutput

ROOT = b"kv-root"


def kv_step(prev: bytes, token: int) -> bytes:
    return hashlib.blake2b(prev + token.to_bytes(8, "little"), digest_size=8).digest()


def kv_chain(tokens: list[int]) -> list[bytes]:
    out, prev = [], ROOT
    for t in tokens:
        prev = kv_step(prev, t)
        out.append(prev)
    return out


class FakeKVRunner:
    def __init__(self, num_blocks: int, num_host_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.tiers = {
            "device": [[None] * block_size for _ in range(num_blocks)],
            "host": [[None] * block_size for _ in range(num_host_blocks)],
        }
        self.reads = 0  # context positions whose K/V were read and checked

    def _copy(self, copies, dst_tier: str) -> None:
        for c in copies:
            src, dst = self.tiers[c.src_tier], self.tiers[dst_tier]
            for a, b in zip(c.src, c.dst, strict=True):
                dst[b] = list(src[a])

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        # The runner's order (sched/output.py): cache write-backs, swap-outs, swap-ins,
        # cache loads, then the forward pass (copies ahead of need touch no block of this
        # batch, so their order is free).
        self._copy(out.cache_out, "host")
        self._copy(out.swap_out, "host")
        self._copy(out.swap_in, "device")
        self._copy(out.cache_in, "device")
        self._copy(out.offload, "host")
        self._copy(out.prefetch, "device")
        dev, bs = self.tiers["device"], self.bs
        result = RunnerOutput()
        for c in out.chunks:
            req, table = c.request, c.block_table
            want = kv_chain(req.all_token_ids[: c.start_pos + c.num_tokens])
            for p in range(c.start_pos):  # the context this chunk attends to
                got = dev[table[p // bs]][p % bs]
                assert got == want[p], (
                    f"{req.request_id} reads wrong K/V at position {p} "
                    f"(block {table[p // bs]}, start {c.start_pos})"
                )
            self.reads += c.start_pos
            prev = (
                dev[table[(c.start_pos - 1) // bs]][(c.start_pos - 1) % bs] if c.start_pos else ROOT
            )
            for j, tok in enumerate(c.token_ids):
                p = c.start_pos + j
                prev = kv_step(prev, tok)
                dev[table[p // bs]][p % bs] = prev
            if c.sample:
                result.sampled[req.request_id] = prev[0] % 7 + 3
        return result
