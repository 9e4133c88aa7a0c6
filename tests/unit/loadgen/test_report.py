"""The run table and the ``compare`` table, as the CLI prints them for real runs.

Each test runs ``tandem loadgen`` as a user would (``loadgen.cli.main`` with the user's
arguments) on the run folders of the ``runs`` fixture (see conftest.py) and reads what it
prints and writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.unit.loadgen.conftest import Runs, row, run_cli


def _right_edges(line: str) -> list[int]:
    """End column of each cell (cells are separated by 2+ spaces, words in one by 1)."""
    return [m.end() for m in re.finditer(r"\S+(?: \S+)*", line)]


def test_compare_slo_row_has_one_aligned_cell_per_run(runs: Runs, tmp_path: Path):
    res = run_cli("compare", str(runs.slo), str(runs.slo), "--labels", "a,b",
                  "--out", str(tmp_path))  # fmt: skip
    assert res.rc == 0, res.stderr
    header = res.stdout.splitlines()[0]
    slo_row = row(res.stdout, "Goodput SLO")
    cells = re.split(r"\s{2,}", slo_row.strip())
    assert cells == ["Goodput SLO", "ttft 500 ms, tpot 50 ms, e2el 4000 ms",
                     "ttft 500 ms, tpot 50 ms, e2el 4000 ms"], slo_row  # fmt: skip
    assert _right_edges(slo_row)[1:] == _right_edges(header), (header, slo_row)
    assert _right_edges(row(res.stdout, "Mean TTFT (ms)"))[1:] == _right_edges(header)


def test_goodput_is_reported_only_with_an_slo(runs: Runs, tmp_path: Path):
    with_slo = json.loads((runs.slo / "results.json").read_text())
    without = json.loads((runs.noslo / "results.json").read_text())
    assert with_slo["goodput"] > 0 and with_slo["goodput_requests"] == 6
    assert with_slo["slo_ms"] == {"ttft": 500.0, "tpot": 50.0, "e2el": 4000.0}
    assert not {"goodput", "goodput_requests", "slo_ms"} & set(without)
    assert "Goodput" not in runs.stdout["noslo"]
    assert row(runs.stdout["slo"], "Goodput (req/s)").split()[-1] == f"{with_slo['goodput']:.2f}"
    res = run_cli("compare", str(runs.noslo), str(runs.noslo), "--labels", "a,b",
                  "--out", str(tmp_path))  # fmt: skip
    assert "Goodput" not in res.stdout and "Completed requests" in res.stdout
    res = run_cli("compare", str(runs.noslo), str(runs.slo), "--labels", "a,b",
                  "--out", str(tmp_path))  # fmt: skip
    assert row(res.stdout, "Goodput (req/s)").split()[-2:] == ["-", f"{with_slo['goodput']:.2f}"]
