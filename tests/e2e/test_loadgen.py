"""`tandem loadgen` against a running `tandem serve`: its counts agree with the server's.

Every request loadgen reports (completed, errors, prompt and output tokens) must match what
the router's /metrics says it served over the same run, including requests the server
refused; plots and the per-request CSV are written; sweeps and comparisons (of runs, sweeps
and a mix of both) work.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.e2e.servers import metrics, serve

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with serve(
        tiny_llama_dir, "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "tiny"
    ) as url:
        yield url


def _loadgen(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadgen",
            *args,
            *([] if args[0] == "compare" else ["--no-progress"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _served(before: dict, after: dict) -> dict:
    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    outcome = 'tandem_requests_total{{outcome="{}"}}'.format
    return {
        "completed": delta(outcome("stop")) + delta(outcome("length")),
        "errors": sum(delta(outcome(o)) for o in ("rejected", "error", "abort")),
        "prompt_tokens": delta("tandem_prompt_tokens_total"),
        "output_tokens": delta("tandem_generation_tokens_total"),
    }


def test_trace_counts_agree_with_server_metrics(server, tiny_llama_dir, tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = [
        {"prompt_len": 20 + 3 * i, "output_len": 8 + i % 9, "timestamp": 100 + 0.05 * i,
         "priority": i % 2}
        for i in range(40)
    ]  # fmt: skip
    rows += [
        {"prompt_len": 400, "output_len": 8, "timestamp": 101.0, "priority": 0}
    ] * 3  # too long
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    before = metrics(server)
    proc = _loadgen("--url", server, "--dataset-path", str(trace), "--tokenizer", str(tiny_llama_dir),
                    "--ignore-eos", "--out", str(out))  # fmt: skip
    served = _served(before, metrics(server))
    results = json.loads((out / "results.json").read_text())
    assert results["completed"] == served["completed"] == 40
    assert results["errors"] == served["errors"] == 3
    assert results["total_input_tokens"] == served["prompt_tokens"]
    assert results["total_output_tokens"] == served["output_tokens"]
    assert results["total_output_tokens"] == sum(r["output_len"] for r in rows[:40])  # ignore_eos
    assert set(results["by_priority"]) == {"0", "1"}
    assert results["by_priority"]["0"]["errors"] == 3
    assert results["error_kinds"] == {"HTTP 400": 3}
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = results[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], key
        assert stats["mean"] > 0
    assert results["config"]["use_trace_timestamps"] is True
    assert results["duration_s"] >= 0.05 * 39  # the trace's spacing was followed
    with open(out / "requests.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 43
    assert sum(1 for r in csv_rows if r["error"]) == 3
    for png in ("cdf.png", "timeline.png"):
        assert (out / png).stat().st_size > 10_000
    assert "Completed requests" in proc.stdout and "priority 1" in proc.stdout


def test_chat_endpoint_and_compare(server, tiny_llama_dir, tmp_path):
    runs = []
    for endpoint in ("completions", "chat"):
        out = tmp_path / endpoint
        before = metrics(server)
        _loadgen("--url", server, "--endpoint", endpoint, "--workload", "random", "--input-len", "32",
                 "--output-len", "12", "--range-ratio", "0.5", "--num-requests", "12",
                 "--request-rate", "20", "--burstiness", "0.5", "--ignore-eos", "--seed", "3",
                 "--tokenizer", str(tiny_llama_dir), "--slo", "ttft:60000,tpot:60000",
                 "--out", str(out))  # fmt: skip
        served = _served(before, metrics(server))
        results = json.loads((out / "results.json").read_text())
        assert results["completed"] == served["completed"] == 12
        assert results["errors"] == served["errors"] == 0
        assert results["total_output_tokens"] == served["output_tokens"]
        assert results["goodput"] == pytest.approx(results["request_throughput"])
        runs.append(out)
    cmp_out = tmp_path / "cmp"
    proc = _loadgen(
        "compare", *map(str, runs), "--labels", "completions,chat", "--out", str(cmp_out)
    )
    assert "completions" in proc.stdout and "chat" in proc.stdout
    assert "Mean TTFT (ms)" in proc.stdout
    assert (cmp_out / "cdf.png").stat().st_size > 10_000


def test_rate_sweep_writes_one_run_per_rate(server, tiny_llama_dir, tmp_path):
    out = tmp_path / "sweep"
    _loadgen("--url", server, "--workload", "alpaca-like", "--max-output-len", "16",
             "--num-requests", "6", "--request-rate", "5,inf", "--tokenizer", str(tiny_llama_dir),
             "--out", str(out))  # fmt: skip
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["request_rate"] for p in sweep["points"]] == [5.0, None]
    assert all(p["completed"] == 6 and p["errors"] == 0 for p in sweep["points"])
    assert (out / "rate-5" / "results.json").is_file() and (out / "rate-inf" / "cdf.png").is_file()
    assert (out / "sweep.png").stat().st_size > 10_000
    assert not any("goodput" in p for p in sweep["points"])  # no --slo: no goodput
    single = tmp_path / "single"
    _loadgen("--url", server, "--workload", "alpaca-like", "--max-output-len", "16",
             "--num-requests", "6", "--request-rate", "5", "--tokenizer", str(tiny_llama_dir),
             "--slo", "ttft:60000", "--out", str(single))  # fmt: skip
    proc = _loadgen("compare", str(out), str(single), "--out", str(tmp_path / "cmp"))
    assert "--- 5 req/s ---" in proc.stdout and "--- inf req/s ---" in proc.stdout
    assert (tmp_path / "cmp" / "sweep.png").stat().st_size > 10_000


def test_bad_flags_and_unreachable_server_fail_clearly(server, tiny_llama_dir, tmp_path):
    tok = ["--tokenizer", str(tiny_llama_dir)]
    for args, flag in [
        (["--slo", "foo:1"], "--slo"),
        (["--request-rate", "0"], "--request-rate"),
        (["--range-ratio", "1.5"], "--range-ratio"),
        (["--dataset-path", str(tmp_path / "missing.json")], "--dataset-path"),
        (["--tokenizer", str(tmp_path)], "--tokenizer"),
        (["--num-requests", "0"], "--num-requests"),
    ]:
        proc = _loadgen("--url", server, *tok, *args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _loadgen("--url", "http://127.0.0.1:9", *tok, check=False)
    assert proc.returncode == 2 and "--url" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_len": 5, "output_len": 3}\n{"prompt_len": 5}\n')
    proc = _loadgen("--url", server, *tok, "--dataset-path", str(bad), check=False)
    assert proc.returncode == 2 and "line 2" in proc.stderr and "output_len" in proc.stderr


def test_without_a_tokenizer_loadgen_uses_the_servers(server, tmp_path):
    """No --tokenizer and no bundled model (an empty cache dir): prompts and counts come
    from the server's /tokenize and /detokenize, and agree with what it served."""
    import os

    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path / "empty-cache")}
    out = tmp_path / "run"
    before = metrics(server)
    proc = subprocess.run(
        [sys.executable, "-m", "loadgen", "--url", server, "--workload", "random",
         "--num-requests", "6", "--input-len", "40", "--output-len", "4", "--ignore-eos",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    served = _served(before, metrics(server))
    results = json.loads((out / "results.json").read_text())
    assert results["completed"] == served["completed"] == 6
    assert results["total_input_tokens"] == served["prompt_tokens"]
    assert results["total_input_tokens"] == pytest.approx(6 * 40, rel=0.1)
    assert results["config"]["tokenizer"] == server + "/tokenize"
