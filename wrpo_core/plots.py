"""Training-curve figures for run reports: alpha schedule, reward margins and loss from metrics.jsonl rows.

Rendered off-screen with matplotlib's Agg canvas (no display, no pyplot global state).
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGSIZE = (12.0, 3.5)  # inches; at DPI that is a 1200 x 350 pixel image
DPI = 100
LOSS = "loss"
ALPHA = "alpha"


def _margin_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reward-margin metrics WRPO logs (`rewards/margins`, and any other `rewards/*margins`)."""
    keys = {key for row in rows for key in row if key.startswith("rewards/") and key.endswith("margins")}
    return sorted(keys, key=lambda key: (key != "rewards/margins", key))


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(step, value) of the rows that have a finite numeric `key` and a step; others are skipped."""
    steps, values = [], []
    for row in rows:
        step, value = row.get("step"), row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if isinstance(step, bool) or not isinstance(step, int | float):
            continue
        steps.append(float(step))
        values.append(float(value))
    return steps, values


def training_curves_png(rows: list[dict]) -> bytes:
    """A PNG of the training curves in metrics.jsonl rows: α schedule, reward margins, loss per global step.

    Rows are the dicts `JsonlMetricsCallback` writes (`step` = optimizer step plus the logged
    metrics). A row without a panel's metric is skipped for that panel (e.g. the final
    `train_loss` summary row, or `alpha` in SFT runs); a panel with no data says "not logged".
    ValueError if no row has a step with a loss, alpha or margin metric. 1200 x 350 px at 100 dpi.
    """
    margins = _margin_keys(rows)
    panels = [
        ("α (fusion coefficient)", [ALPHA]),
        ("reward margins", margins),
        ("training loss", [LOSS]),
    ]
    series = {key: _series(rows, key) for _, keys in panels for key in keys}
    if not any(steps for steps, _ in series.values()):
        raise ValueError(
            f"no training rows to plot: none of {len(rows)} metrics rows has a step with "
            f"'{LOSS}', '{ALPHA}' or a 'rewards/*margins' metric"
        )

    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    for axes, (title, keys) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("global step", fontsize=9)
        axes.tick_params(labelsize=8)
        plotted = [key for key in keys if series[key][0]]
        for key in plotted:
            steps, values = series[key]
            axes.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        if not plotted:
            axes.text(
                0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes, color="gray"
            )
        elif len(plotted) > 1:
            axes.legend(fontsize=7)
        else:
            axes.set_ylabel(plotted[0], fontsize=9)
        if title == "reward margins" and plotted:
            axes.axhline(0.0, color="gray", linewidth=0.6)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    """A `data:image/png;base64,...` URI that embeds a PNG in HTML or Markdown reports."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("png_data_uri: the bytes are not a PNG (no PNG signature)")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
