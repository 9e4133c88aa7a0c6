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
