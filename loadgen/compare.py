"""``tandem loadgen compare DIR ...``: earlier runs and sweeps, side by side.

Each DIR is the ``--out`` folder of a run: a single run (``results.json``, ``requests.csv``)
or a sweep (``sweep.json`` and one ``rate-R`` folder per rate).

- Only single runs: one table with a column per run, and overlaid ``cdf.png`` and
  ``timeline.png`` (every request of every run).
- At least one sweep: every input becomes a series of (offered rate, summary) points, a
  single run being one point at its own rate (``inf`` for ``--request-rate inf``). One
  table is printed per rate, with a column for each input that has a point at that rate,
  and ``sweep.png`` overlays the series.

The plots go to ``--out``, by default ``./loadgen-compare`` (relative to the current
directory); the folder is made only once every input has been read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.report import read_run, render_compare

DEFAULT_OUT = "loadgen-compare"

Points = list[tuple[float, dict[str, Any]]]  # (offered rate in req/s, summary), rate order


def build_compare_parser(prog: str = "tandem loadgen compare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compare loadgen runs, sweeps, or a mix of both (a single run is "
        "compared with the sweeps at its own request rate).",
    )
    p.add_argument("runs", nargs="+", help="--out folders of earlier runs or sweeps")
    p.add_argument("--labels", default=None, help="comma-separated names (default: folder names)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder for the overlaid plots (default: ./%(default)s, in the "
                   "current directory)")  # fmt: skip
    return p


def is_sweep(folder: Path) -> bool:
    return (folder / "sweep.json").is_file()


def read_points(folder: Path) -> Points:
    """A sweep's points, or a single run as one point at its own offered rate."""
    if is_sweep(folder):
        summaries = json.loads((folder / "sweep.json").read_text())["points"]
    else:
        summaries = [read_run(folder)[0]]
    return [(_offered_rate(s), s) for s in summaries]


def _offered_rate(summary: dict[str, Any]) -> float:
    rate = summary.get("request_rate")  # None: --request-rate inf (all at once)
    return math.inf if rate is None else float(rate)


def compare_main(argv: Sequence[str], prog: str = "tandem loadgen compare") -> int:
    parser = build_compare_parser(prog)
    args = parser.parse_args(argv)
    folders = [Path(r) for r in args.runs]
    labels = args.labels.split(",") if args.labels else [f.name for f in folders]
    if len(labels) != len(folders):
        parser.error(f"--labels has {len(labels)} names for {len(folders)} runs")
    out = Path(args.out)
    try:
        if any(is_sweep(f) for f in folders):
            series = {k: read_points(f) for k, f in zip(labels, folders, strict=True)}
            _compare_sweeps(series, out)
        else:
            runs = {k: read_run(f) for k, f in zip(labels, folders, strict=True)}
            _compare_runs(runs, out)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(f"wrote {out}/", file=sys.stderr)
    return 0


def _compare_sweeps(series: dict[str, Points], out: Path) -> None:
    from loadgen.plots import plot_sweep

    for rate in sorted({r for points in series.values() for r, _ in points}):
        print(f"--- {rate:g} req/s ---")
        at_rate = {k: s for k, points in series.items() for r, s in points if r == rate}
        print(render_compare(at_rate))
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep(series, out / "sweep.png")


def _compare_runs(runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]], out: Path) -> None:
    from loadgen.plots import plot_cdfs, plot_timeline

    print(render_compare({k: summary for k, (summary, _) in runs.items()}))
    out.mkdir(parents=True, exist_ok=True)
    plot_cdfs({k: rows for k, (_, rows) in runs.items()}, out / "cdf.png")
    plot_timeline({k: rows for k, (_, rows) in runs.items()}, out / "timeline.png")
