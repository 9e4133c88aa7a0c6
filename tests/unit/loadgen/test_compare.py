"""`tandem loadgen compare`: what it accepts, where it writes, and what --help says of it.

Each test runs the CLI as a user would (``loadgen.cli.main`` with the user's arguments) on
the run folders of the ``runs`` fixture (see conftest.py) and reads what it prints and writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.unit.loadgen.conftest import Runs, row, run_cli

README = Path(__file__).resolve().parents[3] / "README.md"


def test_compare_of_a_sweep_and_a_single_run(runs: Runs, tmp_path: Path):
    res = run_cli("compare", str(runs.sweep), str(runs.slo), "--labels", "sweep,single",
                  "--out", str(tmp_path))  # fmt: skip
    assert res.rc == 0, res.stderr
    sections = re.split(r"^--- (.+) req/s ---$", res.stdout, flags=re.M)[1:]
    tables = dict(zip(sections[::2], sections[1::2], strict=True))
    assert set(tables) == {"20", "40"}
    assert "sweep" in tables["20"] and "single" not in tables["20"]
    header_40 = tables["40"].strip("\n").splitlines()[0].split()
    assert header_40 == ["sweep", "single"]  # the single run sits at its own rate, 40 req/s
    assert row(tables["40"].strip("\n"), "Completed requests").split()[-2:] == ["6", "6"]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_compare_default_out_folder_is_documented_and_used(
    runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    helptext = run_cli("compare", "--help")
    assert helptext.rc == 0
    assert re.search(r"--out OUT\s+.*default: \./loadgen-compare", helptext.stdout, re.S), (
        helptext.stdout
    )
    monkeypatch.chdir(tmp_path)
    res = run_cli("compare", str(runs.slo), str(runs.noslo))
    assert res.rc == 0, res.stderr
    assert (tmp_path / "loadgen-compare" / "cdf.png").is_file()
    section = README.read_text().split("## Load generator", 1)[1].split("\n## ", 1)[0]
    assert "loadgen-compare" in section


def test_failed_compare_writes_no_folder(runs: Runs, tmp_path: Path):
    res = run_cli("compare", str(runs.slo), str(tmp_path / "missing"), "--out",
                  str(tmp_path / "cmp"))  # fmt: skip
    assert res.rc == 2 and "missing" in res.stderr and "no results.json" in res.stderr
    assert not (tmp_path / "cmp").exists()
