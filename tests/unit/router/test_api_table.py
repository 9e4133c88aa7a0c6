"""README's OpenAI API table and ``router.openai_api``'s field sets say the same thing:
every field a body may carry is listed, with what each endpoint does with it."""

from __future__ import annotations

import re
from pathlib import Path

from router.openai_api import IGNORED, REFUSED, SUPPORTED_CHAT, SUPPORTED_COMPLETION

README = Path(__file__).resolve().parents[3] / "README.md"


def _rows() -> dict[str, tuple[str, str]]:
    text = README.read_text("utf-8")
    table = text.split("### OpenAI API fields", 1)[1].split("\n\n", 2)[2]
    rows = {}
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        for field in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[field] = (cells[1], cells[2])
    return rows


def _what(field: str, supported: frozenset) -> str:
    if field in IGNORED:
        return "ignored"
    if field not in supported:
        return "—"
    if field in REFUSED:
        return "refused"
    return "supported"


def test_readme_table_matches_the_field_sets():
    rows = _rows()
    every = SUPPORTED_COMPLETION | SUPPORTED_CHAT | IGNORED
    assert set(rows) == every, set(rows) ^ every
    for field, (completion, chat) in rows.items():
        for cell, supported in ((completion, SUPPORTED_COMPLETION), (chat, SUPPORTED_CHAT)):
            want = _what(field, supported)
            # A refused field accepted at every value it may take reads "ignored".
            ok = cell.startswith(want) or (want == "refused" and cell.startswith("ignored"))
            assert ok, (field, cell, want)
