"""PNG plots of runs (matplotlib, headless Agg backend).

All plots take the rows of ``requests.csv`` (see :func:`loadgen.report.read_run`), so a
single run, a comparison and a sweep are drawn by the same code. Failed requests are left
out of latency curves and counted in the titles. Every axis names its unit.

- ``cdf.png``: CDFs of TTFT (ms), TPOT (ms) and JCT (E2E latency, s), one line per run.
- ``timeline.png``: JCT and TTFT of each request against its send time (s), per run.
- ``sweep.png``: mean and p99 of TTFT, TPOT and JCT against the offered request rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Rows = Sequence[Mapping[str, Any]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _values(rows: Rows, key: str, scale: float = 1.0) -> np.ndarray:
    return np.array(
        [r[key] * scale for r in rows if not r.get("error") and r.get(key) is not None],
        dtype=float,
    )


def _errors(runs: Mapping[str, Rows]) -> str:
    n = {name: sum(1 for r in rows if r.get("error")) for name, rows in runs.items()}
    if not any(n.values()):
        return ""
    return " (failed requests left out: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ")"


def plot_cdfs(runs: Mapping[str, Rows], path: Path) -> Path:
    plt = _plt()
    panels = (("ttft_ms", 1.0, "TTFT (ms)"), ("tpot_ms", 1.0, "TPOT (ms)"),
              ("e2el_ms", 1e-3, "JCT = E2E latency (s)"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        for name, rows in runs.items():
            v = np.sort(_values(rows, key, scale))
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"CDF of {label.split(' (')[0]}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Latency distributions" + _errors(runs))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(runs: Mapping[str, Rows], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (key, label) in zip(
        axes, (("e2el_ms", "JCT (s)"), ("ttft_ms", "TTFT (s)")), strict=True
    ):
        for name, rows in runs.items():
            ok = [r for r in rows if not r.get("error") and r.get(key) is not None]
            x = np.array([r["start_ms"] / 1000 for r in ok])
            y = np.array([r[key] / 1000 for r in ok])
            ax.scatter(x, y, s=8, alpha=0.6, label=name)
            bad = [r["start_ms"] / 1000 for r in rows if r.get("error")]
            if bad:
                ax.scatter(bad, np.zeros(len(bad)), marker="x", color="red", s=20,
                           label=f"{name}: failed")  # fmt: skip
        ax.set_xlabel("request sent at (s since start)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} over time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency over the run" + _errors(runs))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(points: Mapping[str, Sequence[tuple[float, dict[str, Any]]]], path: Path) -> Path:
    """``points``: run label -> [(offered rate in req/s, summary)], one line per label."""
    plt = _plt()
    panels = (("ttft_ms", 1.0, "TTFT (ms)"), ("tpot_ms", 1.0, "TPOT (ms)"),
              ("e2el_ms", 1e-3, "JCT = E2E latency (s)"))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, scale, label) in zip(axes, panels, strict=True):
        for i, (name, series) in enumerate(points.items()):
            finite = [(rate, s) for rate, s in series if np.isfinite(rate)]
            if not finite:
                continue
            rates = [rate for rate, _ in finite]
            color = colors[i % len(colors)]  # one color per run: mean solid, p99 dashed
            for stat, style in (("mean", "-o"), ("p99", "--s")):
                ys = [(s[key][stat] or np.nan) * scale for _, s in finite]
                ax.plot(rates, ys, style, color=color, label=f"{name} {stat}")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} against load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency against load (mean: solid, p99: dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
