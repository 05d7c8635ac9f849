"""PNG plots embedded in markdown metadata (the Dagster UI renders data URIs)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import dagster as dg


def _png_markdown(fig, title: str) -> dg.MetadataValue:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 30) -> dg.MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(list(values), bins=bins, color="#4f6bed")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return _png_markdown(fig, title)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str) -> dg.MetadataValue:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if len(xs) < 20 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return _png_markdown(fig, title)


MARKDOWN_SPECIAL = set("\\`*_{}[]<>()#+!|~")


def escape_markdown(text: str) -> str:
    """Model output and data shown as text, never as markup (``~x~`` would strike through)."""
    return "".join("\\" + ch if ch in MARKDOWN_SPECIAL else ch for ch in str(text)).replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return escape_markdown(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same table as plain aligned text, for the run log (which shows markdown as typed)."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def table(
    header: Sequence[str], rows: Sequence[Sequence[object]], descriptions: dict[str, str] | None = None
) -> dg.MetadataValue:
    """A table the Dagster UI lays out at full width, with typed columns ("Show schema" gives each
    column's description)."""
    kinds = {float: "float", int: "int", bool: "bool"}
    columns = [
        dg.TableColumn(name, kinds.get(type(rows[0][i]), "string") if rows else "string", description=(descriptions or {}).get(name))
        for i, name in enumerate(header)
    ]
    records = [dg.TableRecord({name: value for name, value in zip(header, row)}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))
