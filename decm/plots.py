"""Figures shared by evaluation, reports, sweeps and analysis scripts (matplotlib, Agg backend).

Conventions, so that every figure reads on its own: axis labels name the metric (with
"(lower is better)" where that applies) or the unit; NFE axes carry ticks at the NFEs actually used;
a log scale only where the values span more than a decade; panels in a grid (at most `ncols` per row);
curves that coincide are said to in the legend rather than silently hidden.
"""

from __future__ import annotations

import math
import os

LOWER_IS_BETTER = ("fid", "kid", "sw2", "energy", "loss", "error", "rms", "distance")


def metric_label(name: str) -> str:
    """'sw2' → 'sw2 (lower is better)'; names of scores where higher is better are left as they are."""
    low = name.lower()
    return f"{name} (lower is better)" if any(k in low for k in LOWER_IS_BETTER) else name


def spans_decades(values, ratio: float = 20.0) -> bool:
    """True when the positive values span more than `ratio` (a log scale helps only then)."""
    vals = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return len(vals) > 1 and max(vals) / min(vals) > ratio


def grid(n: int, ncols: int = 3, panel_size=(4.0, 3.2)):
    """(fig, flat list of n axes) in rows of at most `ncols`; unused axes are hidden."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(ncols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def save(fig, path: str, dpi: int = 100, tight: bool = True) -> None:
    """Writes the figure atomically (temp file, then rename) and closes it (`tight`: tight_layout first)."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def mark_coinciding(lines):
    """Appends '(same as X)' to the label of a line whose points equal an earlier line's."""
    out, seen = [], {}
    for label, pts in lines:
        key = tuple((round(float(x), 12), round(float(y), 12)) for x, y in pts)
        if pts and key in seen:
            label = f"{label} (same as {seen[key]})"
        elif pts:
            seen[key] = label
        out.append((label, pts))
    return out


def line_panels(panels: dict, path: str, xlabel: str, ylabel: str | None = None, xlog: bool | str = False,
                ylog: bool | str = "auto", marker: str | None = None, lw: float = 1.0, panel_size=(4.0, 3.2),
                dpi: int = 100, legend_fontsize: int = 7, title_fontsize: int | None = None,
                xticks=None, ncols: int = 3, suptitle: str | None = None, legend: str = "panel") -> bool:
    """Writes line plots, one panel per entry, in a grid, atomically.

    Args:
      panels: {panel title: [(line label, [(x, y), ...]), ...]}; lines without points are skipped.
      path: the .png to write.
      xlabel: x-axis label of every panel (a unit or the quantity, e.g. 'training step', 'NFE').
      ylabel: y-axis label of every panel; None: the panel title through `metric_label`.
      xlog: log-scale x axis (True, False or 'auto': only when x spans more than a decade).
      ylog: log-scale y axis (True, False or 'auto', the default).
      marker: matplotlib marker of the points (None: lines only).
      lw: line width.
      panel_size: (width, height) in inches of one panel.
      dpi: resolution.
      legend_fontsize: font size of the legends.
      title_fontsize: font size of the panel titles (None: matplotlib's default).
      xticks: x values to tick and label exactly (e.g. the NFEs used); None: matplotlib's ticks.
      ncols: panels per row.
      suptitle: a line over the whole figure (e.g. which seed a multi-seed study shows).
      legend: 'panel' (a legend in each panel) or 'figure' (one legend beside the grid, each label one
        colour in every panel: many curves stay visible).

    Returns:
      False (and no file) when no panel has a line with points, else True.
    """
    if not any(pts for lines in panels.values() for _, pts in lines):
        return False
    if legend not in ("panel", "figure"):
        raise ValueError(f"legend must be 'panel' or 'figure', got {legend!r}")
    fig, axes = grid(len(panels), ncols, panel_size)
    labels = list(dict.fromkeys(label for lines in panels.values() for label, pts in lines if pts))
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    handles = {}
    for ax, (title, lines) in zip(axes, panels.items()):
        lines = mark_coinciding([(label, pts) for label, pts in lines if pts])
        for (label, pts), (base, _) in zip(lines, [(lb, p) for lb, p in panels[title] if p]):
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, lw=lw, label=label,
                              **({"color": colour[base]} if legend == "figure" else {}))
            handles.setdefault(base, line)
        same = [label for label, _ in lines if "(same as " in label]
        if legend == "figure" and same:  # the figure legend has one entry per label: say it in the panel
            ax.text(0.02, 0.02, "coincide: " + "; ".join(same), transform=ax.transAxes, fontsize=6, va="bottom",
                    wrap=True)
        xs = [p[0] for _, pts in lines for p in pts]
        ys = [p[1] for _, pts in lines for p in pts]
        if title:
            ax.set_title(title, fontsize=title_fontsize)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if ylabel else metric_label(title) if title else "")
        if xlog is True or (xlog == "auto" and spans_decades(xs, 10.0)):
            ax.set_xscale("log")
        if ylog is True or (ylog == "auto" and spans_decades(ys)):
            ax.set_yscale("log")
        if xticks is not None:
            ax.set_xticks(list(xticks))
            ax.set_xticklabels([f"{x:g}" for x in xticks])
            ax.minorticks_off()
        if legend == "panel" and (len(lines) > 1 or (lines and lines[0][0])):
            ax.legend(fontsize=legend_fontsize)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    if legend == "figure" and any(labels):
        fig.tight_layout(rect=(0, 0, 0.78, 0.95 if suptitle else 1))
        fig.legend([handles[lb] for lb in labels], labels, loc="center left", bbox_to_anchor=(0.79, 0.5),
                   fontsize=legend_fontsize, frameon=False)
        save(fig, path, dpi, tight=False)
        return True
    save(fig, path, dpi)
    return True
