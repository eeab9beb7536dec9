"""What every picture of a run shares: matplotlib without a display, a PNG written whole or not at all,
and percentages as the reports write them. matplotlib is imported on first use: a step that draws
nothing never pays for it."""

from __future__ import annotations

import os

from ..files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (batch jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike) -> None:
    """Lay out, write atomically (a reader never sees half a PNG), free the figure."""
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    pyplot().close(fig)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
