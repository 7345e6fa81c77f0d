"""Line-plot figures shared by evaluation, reports and analysis scripts (matplotlib, Agg backend)."""

from __future__ import annotations

import os


def line_panels(panels: dict, path: str, xlabel: str, ylabel: str | None = None, xlog: bool = False,
                ylog: bool = False, marker: str | None = None, lw: float = 1.0, panel_size=(4.0, 3.2),
                dpi: int = 100, legend_fontsize: int = 6, title_fontsize: int | None = None) -> bool:
    """Writes one row of line plots, one panel per entry, atomically (temp file, then rename).

    Args:
      panels: {panel title: [(line label, [(x, y), ...]), ...]}; lines without points are skipped.
      path: the .png to write.
      xlabel: x-axis label of every panel.
      ylabel: y-axis label of the first panel (None: none).
      xlog: log-scale x axis.
      ylog: log-scale y axis.
      marker: matplotlib marker of the points (None: lines only).
      lw: line width.
      panel_size: (width, height) in inches of one panel.
      dpi: resolution.
      legend_fontsize: font size of the legends.
      title_fontsize: font size of the panel titles (None: matplotlib's default).

    Returns:
      False (and no file) when no panel has a line with points, else True.
    """
    if not any(pts for lines in panels.values() for _, pts in lines):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, pts in lines:
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, lw=lw, label=label)
        if title:
            ax.set_title(title, fontsize=title_fontsize)
        ax.set_xlabel(xlabel)
        if xlog:
            ax.set_xscale("log")
        if ylog:
            ax.set_yscale("log")
        ax.legend(fontsize=legend_fontsize)
    if ylabel:
        axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return True
