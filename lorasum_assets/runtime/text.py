"""Plain-text tables: the CLI's output and the run log's copy of a metadata table (the run log
shows markdown as typed)."""

from __future__ import annotations

from collections.abc import Sequence


def cell_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]], rule: bool = True) -> str:
    """Columns aligned with two spaces between them; ``rule`` draws a line of dashes under the header."""
    cells = [[cell_text(v) for v in row] for row in rows]
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
