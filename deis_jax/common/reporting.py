"""Result tables (CSV + Markdown) and plots (metric vs NFE, 2-D scatters), written atomically."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

from deis_jax.common.files import atomic_write_text, save_figure


def format_number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(format_number(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pivot(
    records: Sequence[dict],
    row_key: str,
    col_key: str,
    cell: Callable[[dict], Any],
    row_order: Sequence | None = None,
    col_order: Sequence | None = None,
) -> tuple[list, list, list[list]]:
    """``(row_labels, col_labels, cells)`` with one record per (row, col)."""
    rows = (
        list(row_order)
        if row_order is not None
        else list(dict.fromkeys(r[row_key] for r in records))
    )
    cols = list(col_order) if col_order is not None else sorted({r[col_key] for r in records})
    index = {(r[row_key], r[col_key]): r for r in records}
    cells = [[cell(index[(a, b)]) if (a, b) in index else None for b in cols] for a in rows]
    return rows, cols, cells


def write_csv(path: str, records: Sequence[dict], fields: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow(r)
    atomic_write_text(path, buf.getvalue())


def write_results(
    prefix: str, rows: Sequence[dict], header: str, fields: Sequence[str] | None = None
) -> str:
    """A benchmark's table: ``<prefix>.csv`` and ``<prefix>.md`` (``header`` then the
    Markdown table of ``fields``, default the first row's keys), both written atomically;
    returns the Markdown text."""
    fields = list(rows[0]) if fields is None else list(fields)
    write_csv(prefix + ".csv", rows, fields)
    text = header + markdown_table(fields, [[r.get(f) for f in fields] for r in rows])
    atomic_write_text(prefix + ".md", text)
    return text


def plot_metric_vs_nfe(
    panels: Sequence[tuple[str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
    path: str,
    ylabel: str,
    xticks: Sequence[float] | None = None,
) -> None:
    """One log-log panel per ``(title, {label: (nfes, values)})``; ticks at ``xticks``
    (default: every NFE plotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (title, curves) in zip(axes[0], panels, strict=True):
        ticks = set()
        for i, (label, (xs, ys)) in enumerate(curves.items()):
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
            if pts:
                style = ("-", "--", ":")[i // 10 % 3]
                ax.loglog(*zip(*pts, strict=True), style, marker="o", ms=3, label=label,
                          color=colors[(2 * i) % 20 + (i // 10) % 2])  # fmt: skip
                ticks.update(p[0] for p in pts)
        ax.set_xticks(sorted(ticks) if xticks is None else list(xticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title)
        ax.set_xlabel("NFE")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:  # no curve at all (e.g. every cell failed)
        axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_scatter_grid(panels: Sequence[tuple[str, Any]], path: str, lim: float = 2.5) -> None:
    """2-D scatter plots, one per ``(title, points (n, 2))``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, pts) in zip(axes.flat, panels, strict=False):
        ax.set_visible(True)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
