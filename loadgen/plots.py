"""PNG plots of runs (matplotlib, headless Agg backend).

``cdf.png`` and ``timeline.png`` take the rows of ``requests.csv`` (see
:func:`loadgen.report.read_run`), so a single run and a comparison are drawn by the same
code; ``sweep.png`` takes the summaries of a sweep's runs. Failed requests are left out of
latency curves and counted in the titles. Every axis names its unit, and every time is in
milliseconds, as in the tables, ``results.json``, ``requests.csv`` and ``--slo``.

- ``cdf.png``: CDFs of TTFT, TPOT and JCT (E2E latency), one line per run.
- ``timeline.png``: JCT and TTFT of each request against its send time, per run.
- ``sweep.png``: mean and p99 of TTFT, TPOT and JCT against the offered request rate, with
  a dotted horizontal line at each SLO threshold the runs had (``--slo``), and the achieved
  throughput (completed requests/s; goodput too with an SLO) against the offered rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Rows = Sequence[Mapping[str, Any]]
SweepPoints = Mapping[str, Sequence[tuple[float, Mapping[str, Any]]]]

# (summary / csv key, name on the axis, --slo key)
LATENCIES = (("ttft_ms", "TTFT", "ttft"), ("tpot_ms", "TPOT", "tpot"),
             ("e2el_ms", "JCT = E2E latency", "e2el"))  # fmt: skip


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ms(name: str) -> str:
    """Axis label of a time: every plot gives times in ms."""
    return f"{name} (ms)"


def _values(rows: Rows, key: str) -> np.ndarray:
    return np.array(
        [r[key] for r in rows if not r.get("error") and r.get(key) is not None], dtype=float
    )


def _errors(runs: Mapping[str, Rows]) -> str:
    n = {name: sum(1 for r in rows if r.get("error")) for name, rows in runs.items()}
    if not any(n.values()):
        return ""
    return " (failed requests left out: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ")"


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_cdfs(runs: Mapping[str, Rows], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, name, _) in zip(axes, LATENCIES, strict=True):
        for run, rows in runs.items():
            v = np.sort(_values(rows, key))
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=run)
        ax.set_xlabel(_ms(name))
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"CDF of {name}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Latency distributions" + _errors(runs))
    return _save(fig, path)


def plot_timeline(runs: Mapping[str, Rows], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (key, name) in zip(axes, (("e2el_ms", "JCT"), ("ttft_ms", "TTFT")), strict=True):
        for run, rows in runs.items():
            ok = [r for r in rows if not r.get("error") and r.get(key) is not None]
            x = np.array([r["start_ms"] for r in ok], dtype=float)
            y = np.array([r[key] for r in ok], dtype=float)
            ax.scatter(x, y, s=8, alpha=0.6, label=run)
            bad = [r["start_ms"] for r in rows if r.get("error")]
            if bad:
                ax.scatter(bad, np.zeros(len(bad)), marker="x", color="red", s=20,
                           label=f"{run}: failed")  # fmt: skip
        ax.set_xlabel(_ms("request sent at, from the start"))
        ax.ticklabel_format(axis="x", style="plain")  # long runs: 1,800,000 ms, not 1.8e6
        ax.set_ylabel(_ms(name))
        ax.set_title(f"{name} over time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency over the run" + _errors(runs))
    return _save(fig, path)


def _finite(series: Sequence[tuple[float, Mapping[str, Any]]]) -> list[tuple[float, Any]]:
    """The points at a finite offered rate (``inf``, all at once, has no place on the x axis)."""
    return [(rate, s) for rate, s in series if np.isfinite(rate)]


def _slo_limits(points: SweepPoints, slo_key: str) -> list[float]:
    """Distinct thresholds (ms) of one SLO over every run of every series."""
    found = {float(s["slo_ms"][slo_key]) for series in points.values() for _, s in series
             if slo_key in (s.get("slo_ms") or {})}  # fmt: skip
    return sorted(found)


def plot_sweep(points: SweepPoints, path: Path) -> Path:
    """``points``: run label -> [(offered rate in req/s, summary)], one color per label."""
    plt = _plt()
    fig, grid = plt.subplots(2, 2, figsize=(12, 9))
    axes = grid.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name, slo_key) in zip(axes[:3], LATENCIES, strict=True):
        for i, (run, series) in enumerate(points.items()):
            finite = _finite(series)
            if not finite:
                continue
            rates = [rate for rate, _ in finite]
            for stat, style in (("mean", "-o"), ("p99", "--s")):
                ys = [s[key][stat] if s[key][stat] is not None else np.nan for _, s in finite]
                ax.plot(rates, ys, style, color=colors[i % len(colors)], label=f"{run} {stat}")
        for limit in _slo_limits(points, slo_key):
            ax.axhline(limit, color="red", linestyle=":", label=f"SLO {limit:g} ms")
        ax.set_ylabel(_ms(name))
        ax.set_title(f"{name} against load")
    _plot_throughput(axes[3], points, colors)
    for ax in axes:
        ax.set_xlabel("offered load (requests/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency and throughput against load (mean: solid, p99: dashed, SLO: dotted)")
    return _save(fig, path)


def _plot_throughput(ax: Any, points: SweepPoints, colors: Sequence[str]) -> None:
    """Completed requests/s (solid) and goodput (dashed, runs with an SLO) against offered."""
    offered = sorted({rate for series in points.values() for rate, _ in _finite(series)})
    if offered:
        ax.plot(offered, offered, ":", color="grey", label="offered")
    for i, (run, series) in enumerate(points.items()):
        finite = _finite(series)
        if not finite:
            continue
        rates = [rate for rate, _ in finite]
        color = colors[i % len(colors)]
        ax.plot(rates, [s["request_throughput"] for _, s in finite], "-o", color=color,
                label=f"{run} completed")  # fmt: skip
        if all(s.get("slo_ms") for _, s in finite):  # goodput means something
            ax.plot(rates, [s["goodput"] for _, s in finite], "--s", color=color,
                    label=f"{run} goodput")  # fmt: skip
    ax.set_ylabel("achieved throughput (req/s)")
    ax.set_title("Achieved throughput against load")
