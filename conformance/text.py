"""Aligned text tables: the one renderer behind every table the toolkit prints."""

from __future__ import annotations

from collections.abc import Sequence


def aligned(rows: Sequence[Sequence[str]], header: bool = True) -> list[str]:
    """``rows`` as lines, each column padded to its widest cell, two spaces apart, without
    trailing blanks; with ``header`` the first row is the header and a rule follows it."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
