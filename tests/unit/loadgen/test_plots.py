"""loadgen's plots, inspected as matplotlib figures: the CLI draws them from real run folders.

``figures`` records every figure the CLI saves (by file name), so a test reads the axes,
labels and lines of exactly what went into ``cdf.png``, ``timeline.png`` and ``sweep.png``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.loadgen.conftest import SLO, Runs, run_cli

TIMED = ("TTFT", "TPOT", "JCT", "latency", "sent at")  # axis labels that measure time


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """File name -> the matplotlib Figure saved under it, for every figure saved meanwhile."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved: dict[str, Any] = {}
    original = Figure.savefig

    def record(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> Any:
        saved[Path(fname).name] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    yield saved


def _axis(fig: Any, ylabel_start: str) -> Any:
    found = [ax for ax in fig.axes if ax.get_ylabel().startswith(ylabel_start)]
    assert len(found) == 1, [ax.get_ylabel() for ax in fig.axes]
    return found[0]


def _slo_lines(ax: Any) -> list[float]:
    """y of every horizontal line labelled as an SLO on ``ax``."""
    return [float(ln.get_ydata()[0]) for ln in ax.get_lines()
            if "SLO" in ln.get_label() and len(set(ln.get_ydata())) == 1]  # fmt: skip


def _csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "requests.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_plot_has_an_achieved_throughput_panel(runs: Runs, tmp_path: Path, figures):
    res = run_cli("compare", str(runs.sweep), "--out", str(tmp_path))
    assert res.rc == 0, res.stderr
    points = json.loads((runs.sweep / "sweep.json").read_text())["points"]
    ax = _axis(figures["sweep.png"], "achieved throughput (req/s)")
    assert ax.get_xlabel() == "offered load (requests/s)"
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    achieved = lines["sweep completed"]
    assert list(achieved.get_xdata()) == [20.0, 40.0]
    assert np.allclose(achieved.get_ydata(), [p["request_throughput"] for p in points])
    assert np.allclose(lines["sweep goodput"].get_ydata(), [p["goodput"] for p in points])
    assert list(lines["offered"].get_ydata()) == [20.0, 40.0]  # the y = x reference


@pytest.mark.parametrize("slo", [SLO, None])
def test_sweep_plot_draws_slo_lines_when_slo_is_given(
    fake_server: str, tiny_llama_dir: Path, tmp_path: Path, figures, slo: str | None
):
    res = run_cli("--url", fake_server, "--tokenizer", str(tiny_llama_dir), "--workload", "random",
                  "--input-len", "8", "--output-len", "4", "--num-requests", "3",
                  "--request-rate", "20,40", "--no-progress", "--out", str(tmp_path),
                  *(["--slo", slo] if slo else []))  # fmt: skip
    assert res.rc == 0, res.stderr
    fig = figures["sweep.png"]
    panels = {"TTFT": 500.0, "TPOT": 50.0, "JCT": 4000.0}
    for name, limit in panels.items():
        assert _slo_lines(_axis(fig, name)) == ([limit] if slo else []), name
    throughput = _axis(fig, "achieved throughput")
    assert ("goodput" in " ".join(ln.get_label() for ln in throughput.get_lines())) == bool(slo)


def test_every_time_axis_is_in_ms(runs: Runs, tmp_path: Path, figures):
    assert run_cli("compare", str(runs.slo), str(runs.noslo), "--out", str(tmp_path)).rc == 0
    assert run_cli("compare", str(runs.sweep), "--out", str(tmp_path / "s")).rc == 0
    assert set(figures) == {"cdf.png", "timeline.png", "sweep.png"}
    for name, fig in figures.items():
        for ax in fig.axes:
            for label in (ax.get_xlabel(), ax.get_ylabel()):
                assert "(s)" not in label, (name, label)
                if any(word in label for word in TIMED):
                    assert label.endswith("(ms)"), (name, label)
    rows = _csv(runs.slo)
    ttft = [float(r["ttft_ms"]) for r in rows]  # the data, in ms, as requests.csv has it
    timeline = _axis(figures["timeline.png"], "TTFT")
    offsets = timeline.collections[0].get_offsets()  # the first run's scatter: slo
    assert np.allclose(offsets[:, 0], [float(r["start_ms"]) for r in rows])
    assert np.allclose(offsets[:, 1], ttft)
    for name, key in (("TTFT", "ttft_ms"), ("JCT", "e2el_ms")):
        cdf = next(ax for ax in figures["cdf.png"].axes if ax.get_xlabel().startswith(name))
        assert np.allclose(cdf.get_lines()[0].get_xdata(), sorted(float(r[key]) for r in rows))
    points = json.loads((runs.sweep / "sweep.json").read_text())["points"]
    jct = {ln.get_label(): ln for ln in _axis(figures["sweep.png"], "JCT").get_lines()}
    assert np.allclose(jct["sweep mean"].get_ydata(), [p["e2el_ms"]["mean"] for p in points])
