"""Plain-text tables for the command line: left-aligned columns under a header, two spaces apart."""
from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[Sequence[str]], columns: Sequence[str]) -> str:
    """Left-aligned columns under `columns`, two spaces apart."""
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [columns, *rows])
