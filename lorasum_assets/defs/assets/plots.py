"""Plots and tables for the Dagster UI's metadata.

The UI lays out a markdown entry inline only while it is under 1000 characters; longer ones hide
behind a "[Show Markdown]" link. A plot is therefore drawn as a small black-and-white PNG, at the
largest resolution whose data URI keeps it inline.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import dagster as dg

# The Dagster UI (1.13) renders markdown metadata inline below this many characters.
INLINE_MARKDOWN_LIMIT = 1000
PLOT_DPIS = (100, 90, 80, 72, 64, 56)
# Without antialiasing the picture has two colours, and a 1-bit PNG of it stays small. Tick labels
# are drawn when the figure is saved, so saving uses the style too.
ONE_BIT_STYLE = {"text.antialiased": False, "lines.antialiased": False, "patch.antialiased": False, "font.size": 8}


def _figure(width_in: float = 3.4, height_in: float = 1.7):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(ONE_BIT_STYLE):
        fig, ax = plt.subplots(figsize=(width_in, height_in))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _one_bit_png(fig, dpi: int) -> bytes:
    from PIL import Image

    rendered = io.BytesIO()
    fig.savefig(rendered, format="png", dpi=dpi, bbox_inches="tight")
    image = Image.open(io.BytesIO(rendered.getvalue())).convert("L").point(lambda p: 255 if p > 160 else 0).convert("1")
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return out.getvalue()


def png_markdown(fig, title: str) -> dg.MetadataValue:
    """The figure as an inline PNG: the sharpest of PLOT_DPIS that stays under the inline limit
    (the smallest one, shown behind the UI's link, if none does)."""
    import matplotlib.pyplot as plt

    with plt.rc_context(ONE_BIT_STYLE):
        for dpi in PLOT_DPIS:
            markdown = f"![{title}](data:image/png;base64,{base64.b64encode(_one_bit_png(fig, dpi)).decode()})"
            if len(markdown) < INLINE_MARKDOWN_LIMIT:
                break
    plt.close(fig)
    return dg.MetadataValue.md(markdown)


def histogram(values: Sequence[float], title: str, xlabel: str, ylabel: str, bins: int | None = None) -> dg.MetadataValue:
    """Counts on the y axis, so its ticks are whole numbers."""
    from matplotlib.ticker import MaxNLocator

    values = list(values)
    fig, ax = _figure()
    ax.hist(values, bins=bins or max(5, min(20, round(len(values) ** 0.5))), color="black", edgecolor="white")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return png_markdown(fig, title)


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str) -> dg.MetadataValue:
    """Steps on the x axis, so its ticks are whole numbers."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    for (label, (xs, ys)), style in zip(series.items(), ("-", "--", ":")):
        ax.plot(list(xs), list(ys), style, color="black", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(frameon=False)
    return png_markdown(fig, title)


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
