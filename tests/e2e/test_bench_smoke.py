"""CI smoke run of a loadgen-driven benchmark (bench/serving_sweep.py, tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_chunked_prefill_sweep_smoke(tiny_llama_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/serving_sweep.py", "chunked", "--smoke", "--model", str(tiny_llama_dir),
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "serving_sweep_chunked.json").read_text())
    assert set(result["variants"]) == {"chunked", "no-chunked"}
    for points in result["variants"].values():
        assert points[0]["completed"] == 8 and points[0]["errors"] == 0
        assert points[0]["itl_ms_p99"] > 0
    assert "capacity under the SLO" in proc.stdout
    assert (tmp_path / "cdf.png").is_file()


def test_prefix_cache_bench_smoke(tiny_llama_dir, tmp_path):
    out = tmp_path / "prefix_cache.json"
    proc = subprocess.run(
        [sys.executable, "bench/prefix_cache.py", "--model", str(tiny_llama_dir),
         "--workloads", "chat", "--conversations", "3", "--turns", "2", "--system-len", "64",
         "--user-len", "8", "--output-len", "4", "--rate", "inf", "--out", str(out),
         "--serve-args", "--policy fcfs"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    chat = json.loads(out.read_text())["workloads"]["chat"]
    on, off = chat["caching on"], chat["caching off"]
    assert on["completed"] == off["completed"] == 6 and on["errors"] == off["errors"] == 0
    # The 3 second turns hit (the first turns cannot): about half the prompt tokens.
    assert 0.3 < on["prefix_cache"]["token_hit_rate"] < 0.7
    assert on["prefix_cache"]["request_hit_rate"] == 0.5
    assert off["prefix_cache"]["token_hit_rate"] == 0.0
    assert chat["ratios"]["ttft_p50"] > 0 and "off / on" in proc.stdout


def test_step_profile_smoke(tmp_path):
    """bench/gpu_step_profile.py on CPU with tiny shapes: every launched step recorded and
    classified, the totals add up."""
    out = tmp_path / "steps.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_step_profile.py", "--device", "cpu", "--dtype", "float32",
         "--model", "llama-3-debug", "--workload", "uniform", "--num-requests", "4",
         "--output-len", "4", "--max-input", "64", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    classes = steps["classes"]
    assert classes["eager + prefill"]["prefill_tokens_mean"] > 0
    assert sum(c["steps"] for c in classes.values()) == steps["steps"] >= 4
    assert steps["gpu_busy_s"] is None and "| step class |" in proc.stdout
def test_gpu_jct_bench_smoke(tmp_path):
    """bench/gpu_jct.py on the CPU with the bundled tiny model: capacity run, two policies,
    one setting; a given cost model skips the profiling step."""
    from tandem.sched.cost_model import CostModel

    cost = tmp_path / "cost.json"
    CostModel().save(cost)
    out = tmp_path / "jct.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_jct.py", "--device", "cpu", "--policies", "fcfs,alise",
         "--settings", "bursty@1.1", "--num-requests", "6", "--capacity-requests", "6",
         "--max-input-len", "32", "--max-output-len", "8", "--cost-model", str(cost),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["bursty@1.1"]
    assert result["fcfs"]["completed"] == result["alise"]["completed"] == 6
    assert result["alise"]["errors"] == 0 and result["alise"]["mean_ratio_vs_fcfs"] > 0
    assert "fcfs ÷ policy" in proc.stdout
