"""The requests a run sends: synthetic workloads, ShareGPT files and JSONL traces.

Every source produces the same thing, a list of :class:`Job` (prompt text, its token count
under the run's tokenizer, the output length to ask for, and optionally an arrival time and
a priority class). Sampling is reproducible: the same arguments and seed give the same jobs.

Sources
-------
``random``
    Input and output lengths uniform in ``[len·(1-r), len·(1+r)]`` (``r`` = range ratio),
    prompts of random ordinary tokens (vLLM's random dataset).
``sharegpt-like`` / ``alpaca-like``
    Log-normal lengths with the published trace statistics (see :mod:`loadgen.workloads`):
    heavy-tailed outputs, task templates that share a prompt prefix.
``prefix`` / ``chat``
    Shared system prompts, and multi-turn conversations that resend their history
    (:mod:`loadgen.shared_prefix`): the workloads that prefix caching speeds up.
``--dataset-path FILE.json``
    ShareGPT format: a list of ``{"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}``; the first human turn is the prompt, the reply's
    token count is the output length. Conversations without a reply are skipped.
``--dataset-path FILE.jsonl``
    A trace: one JSON object per line with ``prompt`` (text) or ``prompt_len`` (tokens),
    ``output_len``, and optional ``timestamp`` (seconds; shifted so the first is 0) and
    ``priority`` (int; lower is more urgent, as in the API).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadgen.shared_prefix import SHARED_PREFIX_WORKLOADS, chat_turns, prefix_prompts
from loadgen.tokens import PromptTokenizer
from loadgen.workloads import WORKLOADS, sample_requests

SYNTHETIC = ("random", *WORKLOADS, *SHARED_PREFIX_WORKLOADS)


class DatasetError(ValueError):
    """A dataset file or workload argument is unusable (message says where and why)."""


@dataclass(frozen=True)
class Job:
    index: int
    prompt: str
    prompt_len: int
    output_len: int
    timestamp: float | None = None  # from a trace: seconds after the first request
    priority: int | None = None
    # A chat turn: the index of the previous turn of its conversation. The runner sends
    # this one after that one ended, with prompt = that prompt + its answer + ``turn``.
    after: int | None = None
    turn: str = ""


def random_jobs(
    tok: PromptTokenizer, n: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[Job]:
    rng = np.random.default_rng(seed)

    def lengths(center: int) -> np.ndarray:
        lo = max(1, int(center * (1 - range_ratio)))
        hi = max(lo, int(center * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, n)

    ins, outs = lengths(input_len), lengths(output_len)
    jobs = []
    for i in range(n):
        text, real = tok.text_of_length(rng, int(ins[i]))
        jobs.append(Job(i, text, real, int(outs[i])))
    return jobs


def synthetic_jobs(
    tok: PromptTokenizer,
    workload: str,
    n: int,
    seed: int,
    max_input_len: int = 2048,
    max_output_len: int = 2048,
) -> list[Job]:
    vocab = len(tok.usable_ids)
    reqs = sample_requests(
        workload,
        n,
        seed=seed,
        vocab_size=vocab,
        max_input_len=max_input_len,
        max_output_len=max_output_len,
    )
    jobs = []
    for i, r in enumerate(reqs):
        text, real = tok.text_of_ids(r.prompt_token_ids)
        jobs.append(Job(i, text, real, r.output_len))
    return jobs


def shared_prefix_jobs(
    tok: PromptTokenizer,
    workload: str,
    n: int,
    seed: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    turns: int,
) -> list[Job]:
    """``prefix``: ``n`` requests over ``num_prefixes`` prefixes. ``chat``:
    ``num_prefixes`` conversations of ``turns`` turns (``n`` is ignored)."""
    vocab = len(tok.usable_ids)
    try:
        if workload == "prefix":
            jobs = []
            for i, (pre, suf) in enumerate(
                prefix_prompts(n, num_prefixes, prefix_len, suffix_len, vocab, seed)
            ):
                text, real = tok.text_of_ids(pre + suf)
                jobs.append(Job(i, text, real, output_len))
            return jobs
        rows = chat_turns(num_prefixes, turns, prefix_len, suffix_len, output_len, vocab, seed)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    jobs, last = [], {}
    for i, (conv, _, static, user) in enumerate(rows):
        text, real = tok.text_of_ids(static)
        turn_text = tok.text_of_ids(user)[0]
        jobs.append(Job(i, text, real, output_len, after=last.get(conv), turn=turn_text))
        last[conv] = i
    return jobs


def sharegpt_jobs(tok: PromptTokenizer, path: Path, n: int, seed: int) -> list[Job]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"--dataset-path {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, list):
        raise DatasetError(f"--dataset-path {path}: expected a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if isinstance(prompt, str) and isinstance(reply, str) and prompt and reply:
            pairs.append((prompt, reply))
    if not pairs:
        raise DatasetError(f"--dataset-path {path}: no conversation with a prompt and a reply")
    order = np.random.default_rng(seed).permutation(len(pairs))
    jobs = []
    for k in range(n):  # cycle when the file has fewer conversations than requests
        prompt, reply = pairs[order[k % len(pairs)]]
        jobs.append(Job(k, prompt, tok.count(prompt), max(1, tok.count(reply))))
    return jobs


def trace_jobs(tok: PromptTokenizer, path: Path, seed: int) -> list[Job]:
    rng = np.random.default_rng(seed)
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DatasetError(f"--dataset-path {path}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out = int(row["output_len"])
            if out < 1:
                raise ValueError("output_len must be >= 1")
            if "prompt" in row:
                prompt = str(row["prompt"])
                plen = tok.count(prompt)
            else:
                plen = int(row["prompt_len"])
                if plen < 1:
                    raise ValueError("prompt_len must be >= 1")
                prompt, plen = tok.text_of_length(rng, plen)
            ts = row.get("timestamp")
            prio = row.get("priority")
            rows.append(
                (
                    prompt,
                    plen,
                    out,
                    None if ts is None else float(ts),
                    None if prio is None else int(prio),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise DatasetError(f"--dataset-path {path}, line {lineno}: {msg}") from None
    if not rows:
        raise DatasetError(f"--dataset-path {path}: no requests in the trace")
    stamps = [r[3] for r in rows if r[3] is not None]
    t0 = min(stamps) if stamps else 0.0
    return [
        Job(i, p, n, o, None if ts is None else ts - t0, prio)
        for i, (p, n, o, ts, prio) in enumerate(rows)
    ]


def load_jobs(
    tok: PromptTokenizer,
    *,
    workload: str,
    num_requests: int,
    seed: int,
    dataset_path: str | None = None,
    input_len: int = 256,
    output_len: int = 128,
    range_ratio: float = 0.0,
    max_input_len: int = 2048,
    max_output_len: int = 2048,
    num_prefixes: int = 4,
    prefix_len: int = 512,
    suffix_len: int = 64,
    turns: int = 4,
) -> list[Job]:
    """The jobs of a run (for a trace: all its rows, ``num_requests`` ignored; for
    ``chat``: every turn of every conversation)."""
    if dataset_path is not None:
        path = Path(dataset_path)
        if not path.is_file():
            raise DatasetError(f"--dataset-path {path}: no such file")
        if path.suffix == ".jsonl":
            return trace_jobs(tok, path, seed)
        return sharegpt_jobs(tok, path, num_requests, seed)
    if workload == "random":
        return random_jobs(tok, num_requests, input_len, output_len, range_ratio, seed)
    if workload in WORKLOADS:
        return synthetic_jobs(tok, workload, num_requests, seed, max_input_len, max_output_len)
    if workload in SHARED_PREFIX_WORKLOADS:
        return shared_prefix_jobs(
            tok, workload, num_requests, seed, num_prefixes, prefix_len, suffix_len,
            output_len, turns,
        )  # fmt: skip
    raise DatasetError(f"--workload {workload!r}: choose one of {', '.join(SYNTHETIC)}")
