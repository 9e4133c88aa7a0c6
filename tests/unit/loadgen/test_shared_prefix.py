"""The prefix-caching workloads: shared prefixes that re-encode to the same tokens, and
chat turns that resend their history with the answer the server really gave."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from loadgen.cli import build_run_parser
from loadgen.client import Target
from loadgen.dataset import DatasetError, load_jobs
from loadgen.runner import run_load
from loadgen.tokens import PromptTokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return PromptTokenizer(tiny_llama_dir)


def _kw(**over):
    kw = dict(num_requests=12, seed=3, num_prefixes=3, prefix_len=40, suffix_len=9,
              output_len=5, turns=3)  # fmt: skip
    kw.update(over)
    return kw


def test_prefix_jobs_share_exact_token_prefixes(tok):
    jobs = load_jobs(tok, workload="prefix", **_kw())
    assert len(jobs) == 12 and jobs == load_jobs(tok, workload="prefix", **_kw())
    ids = [tok.encode(j.prompt) for j in jobs]
    assert all(j.prompt_len == len(i) == 49 for j, i in zip(jobs, ids, strict=True))
    for k in range(12):
        same = [m for m in range(12) if m % 3 == k % 3]
        assert all(ids[m][:40] == ids[k][:40] for m in same)  # the shared prefix
        assert all(ids[m][:40] != ids[k][:40] for m in range(12) if m % 3 != k % 3)
        assert all(ids[m][40:] != ids[k][40:] for m in same if m != k)  # own suffixes


def test_chat_jobs_are_turns_that_extend_their_history(tok):
    jobs = load_jobs(tok, workload="chat", **_kw(num_prefixes=2))
    assert len(jobs) == 2 * 3  # every turn of every conversation, first turns first
    assert [j.after for j in jobs] == [None, None, 0, 1, 2, 3]
    for j in jobs[2:]:
        prev = jobs[j.after]
        assert tok.encode(j.prompt)[: prev.prompt_len] == tok.encode(prev.prompt)
        assert j.prompt_len == prev.prompt_len + 5 + 9  # synthetic answer + new user text
        assert len(tok.encode(j.turn)) == 9
    with pytest.raises(DatasetError, match="turns"):
        load_jobs(tok, workload="chat", **_kw(turns=0))


def test_cli_accepts_the_workload_flags():
    args = build_run_parser().parse_args(
        ["--workload", "chat", "--num-prefixes", "8", "--prefix-len", "256",
         "--suffix-len", "32", "--turns", "5"]
    )  # fmt: skip
    assert (args.workload, args.num_prefixes, args.prefix_len, args.suffix_len, args.turns) == (
        "chat",
        8,
        256,
        32,
        5,
    )


def test_a_turn_is_sent_after_the_previous_one_with_its_real_answer(tok):
    seen: list[tuple[str, float]] = []

    async def handler(request):
        body = await request.json()
        seen.append((body["prompt"], asyncio.get_running_loop().time()))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(0.05)
        answer = f" answer{len(seen)}"
        for c in ({"choices": [{"index": 0, "text": answer}]},
                  {"choices": [], "usage": {"completion_tokens": 1}}):  # fmt: skip
            await resp.write(b"data: " + json.dumps(c).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        jobs = load_jobs(tok, workload="chat", **_kw(num_prefixes=1, turns=3))
        try:
            records, _ = await run_load(Target(url, "m"), jobs, num_requests=3, tok=tok)
        finally:
            await runner.cleanup()
        return jobs, records

    jobs, records = asyncio.run(main())
    assert all(r.ok for r in records)
    (p0, t0), (p1, t1), (p2, t2) = seen
    assert p0 == jobs[0].prompt
    assert p1 == p0 + " answer1" + jobs[1].turn and t1 >= t0 + 0.05  # after turn 0 ended
    assert p2 == p1 + " answer2" + jobs[2].turn and t2 >= t1 + 0.05
    assert records[2].prompt_len == len(tok.encode(p2))
