"""Reports of a run: the final table, ``results.json``, ``requests.csv`` and reading them back.

``results.json`` holds the summary of :func:`loadgen.metrics.summarize` plus ``config`` (the
run's arguments). ``requests.csv`` has one row per request sent, errors included, with
times in milliseconds (``start_ms`` from the beginning of the run).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.client import RequestRecord

CSV_FIELDS = ("index", "priority", "start_ms", "prompt_len", "requested_output_len",
              "output_len", "ttft_ms", "tpot_ms", "e2el_ms", "mean_itl_ms", "status", "error")  # fmt: skip

_ROWS = (
    ("Completed requests", "completed", "{:d}"),
    ("Errors", "errors", "{:d}"),
    ("Duration (s)", "duration_s", "{:.2f}"),
    ("Total input tokens", "total_input_tokens", "{:d}"),
    ("Total output tokens", "total_output_tokens", "{:d}"),
    ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", "{:.1f}"),
    ("Total token throughput (tok/s)", "total_token_throughput", "{:.1f}"),
)
_LATENCIES = (
    ("TTFT", "ttft_ms"),
    ("TPOT", "tpot_ms"),
    ("ITL", "itl_ms"),
    ("E2E latency", "e2el_ms"),
)


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, formatted value) rows of a summary; goodput rows only for a run with an SLO."""
    rows = [(label, _fmt(fmt, summary.get(key))) for label, key, fmt in _ROWS]
    if summary.get("slo_ms"):  # results.json of older runs has goodput without an SLO too
        slo = ", ".join(f"{k} {v:g} ms" for k, v in summary["slo_ms"].items())
        rows.append(("Goodput (req/s)", _fmt("{:.2f}", summary.get("goodput"))))
        rows.append(("Goodput SLO", slo))
    for label, key in _LATENCIES:
        stats = summary.get(key) or {}
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{stat.capitalize() if stat == 'mean' else stat} {label} (ms)",
                         _fmt("{:.2f}", stats.get(stat))))  # fmt: skip
    return rows


# every row a table can have, in table order (a summary with an SLO has them all)
_ROW_ORDER = [metric for metric, _ in table_rows({"slo_ms": {"ttft": 1.0}})]


def render_table(summary: dict[str, Any], title: str = "Serving benchmark result") -> str:
    rows = table_rows(summary)
    width = max(len(a) for a, _ in rows) + 2
    vwidth = max(12, max(len(b) for _, b in rows))
    lines = [f"{' ' + title + ' ':=^{width + vwidth}}"]
    lines += [f"{a:<{width}}{b:>{vwidth}}" for a, b in rows]
    by_prio = summary.get("by_priority") or {}
    if by_prio:
        lines.append(f"{' by priority class ':-^{width + vwidth}}")
        for cls, s in by_prio.items():
            ttft, e2e = s["ttft_ms"], s["e2el_ms"]
            lines.append(
                f"priority {cls}: {s['completed']} ok, {s['errors']} errors, "
                f"TTFT p50 {_fmt('{:.1f}', ttft['p50'])} ms, "
                f"E2E mean {_fmt('{:.1f}', e2e['mean'])} / p99 {_fmt('{:.1f}', e2e['p99'])} ms"
            )
    if summary.get("error_kinds"):
        lines.append(f"{' errors ':-^{width + vwidth}}")
        lines += [f"{n:>6} x {kind}" for kind, n in summary["error_kinds"].items()]
    lines.append("=" * (width + vwidth))
    return "\n".join(lines)


def render_compare(summaries: dict[str, dict[str, Any]]) -> str:
    """Side-by-side table: one right-aligned column per run, "-" where a run lacks a row.

    Rows are the union of every run's rows (a run without an SLO has no goodput rows), in
    table order. Every column is as wide as its widest cell plus two spaces, so no two
    values ever touch.
    """
    labels = list(summaries)
    per_run = {name: dict(table_rows(s)) for name, s in summaries.items()}
    metrics = list(dict.fromkeys(m for rows in per_run.values() for m in rows))
    metrics.sort(key=_ROW_ORDER.index)
    width = max(len(m) for m in metrics) + 2
    cols = {n: 2 + max(12, len(n), *(len(v) for v in per_run[n].values())) for n in labels}
    lines = [f"{'':<{width}}" + "".join(f"{n:>{cols[n]}}" for n in labels)]
    for m in metrics:
        cells = "".join(f"{per_run[n].get(m, '-'):>{cols[n]}}" for n in labels)
        lines.append(f"{m:<{width}}{cells}")
    return "\n".join(lines)


def write_run(
    out: Path, summary: dict[str, Any], records: Sequence[RequestRecord], config: dict[str, Any]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**summary, "config": config}, indent=2) + "\n")
    with open(out / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in sorted(records, key=lambda r: r.index):
            w.writerow(
                [
                    r.index,
                    "" if r.priority is None else r.priority,
                    f"{r.start * 1000:.3f}",
                    r.prompt_len,
                    r.requested_output_len,
                    r.output_len,
                    _ms(r.ttft),
                    _ms(r.tpot),
                    _ms(r.latency),
                    _ms(sum(r.itl) / len(r.itl) if r.itl else None),
                    "" if r.status is None else r.status,
                    r.error or "",
                ]
            )


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.3f}"


def read_run(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results.json, requests.csv rows with numbers parsed) of a run folder."""
    folder = Path(path)
    results = folder / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{folder}: no results.json (is it a loadgen --out folder?)")
    summary = json.loads(results.read_text())
    rows: list[dict[str, Any]] = []
    csv_path = folder / "requests.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append({k: _num(v) for k, v in row.items()})
    return summary, rows


def _num(v: str) -> Any:
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v
