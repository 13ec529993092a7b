"""Plots for training runs and the evaluation report, drawn with matplotlib (Agg: no display needed).

`plot_losses` draws total, text and image loss (redrawn by the trainer at each checkpoint); `plot_training_curves`
adds the z-loss and mean log Z panels (the signals of logit drift) for the evaluation report; `draw_score_bars`
draws measured scores beside their baselines with standard-error bars. Every figure has labelled axes with units and a
legend, and is written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from runkit.runs import read_log  # noqa: E402

# (log key, legend label, colour)
LOSS_SERIES = (("loss", "total", "#222222"), ("text_loss", "text targets", "#1f77b4"),
               ("image_loss", "picture targets", "#d62728"))
CURVES = {  # file stem -> (y-axis label, series)
    "loss": ("cross-entropy (nats per target token)", LOSS_SERIES),
    "z_loss": ("z-loss (weighted log²Z)", (("z_loss", "z-loss", "#9467bd"),)),
    "log_z": ("mean log Z of the softmax (nats)", (("log_z", "mean log Z", "#2ca02c"),)),
}
# bar colours of the columns of a scores plot, baselines muted
COLUMN_COLOURS = {"trained": "#1f77b4", "before_training": "#bbbbbb", "chance": "#ff9f40", "ceiling": "#2ca02c"}


def save_figure(figure, out: str | os.PathLike) -> Path:
    """Write a figure as PNG beside its final name, then move it into place (a reader never sees half a file)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, out)
    return out


def draw_series(axes, records: list[dict], series: tuple, ylabel: str = "value", title: str | None = None,
                legend_size: str = "medium") -> bool:
    """Draw `series` ((key, label, colour), ...) of a training log against the optimizer step on `axes`;
    False when the log holds none of them."""
    lines = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None] for key, _, _ in series}
    for key, label, colour in series:
        if lines[key]:
            steps, values = zip(*lines[key])
            axes.plot(steps, values, label=label, color=colour, linewidth=1.6, marker="." if len(steps) < 3 else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    if any(lines.values()):
        axes.legend(frameon=False, fontsize=legend_size)
    return any(lines.values())


def plot_series(records: list[dict], series: tuple, out: str | os.PathLike, ylabel: str = "value",
                title: str | None = None) -> Path | None:
    """`draw_series` in a figure of its own; returns the PNG path, or None when there is nothing to draw."""
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    if not draw_series(axes, records, series, ylabel, title):
        plt.close(figure)
        return None
    return save_figure(figure, out)


def plot_losses(log_path: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Total, text and image loss from a training log.jsonl; returns the PNG path, or None when there is nothing."""
    ylabel, series = CURVES["loss"]
    return plot_series(read_log(log_path), series, out, ylabel, "training loss")


def plot_training_curves(records: list[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """OUT_DIR/{loss,z_loss,log_z}.png from a training log's records (`runkit.runs.read_log`); returns the ones
    drawn."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    drawn = {name: plot_series(records, series, Path(out_dir) / f"{name}.png", ylabel)
             for name, (ylabel, series) in CURVES.items()}
    return {name: path for name, path in drawn.items() if path is not None}


def draw_score_bars(axes, rows: list[tuple[str, dict[str, tuple[float, float | None]]]],
                    xlabel: str = "% of held-out items right (±1 standard error)") -> None:
    """Horizontal grouped bars on `axes`, one group per row: rows are (label, {column: (value in [0, 1],
    standard error or None)}) with columns among COLUMN_COLOURS (the model, then its baselines)."""
    columns = [c for c in COLUMN_COLOURS if any(c in values for _, values in rows)]
    height = 0.8 / max(1, len(columns))
    for offset, column in enumerate(columns):
        bars = [(number, *values[column]) for number, (_, values) in enumerate(rows) if column in values]
        errors = [0.0 if e is None or e != e else 100 * e for _, _, e in bars]
        axes.barh([n + (offset - (len(columns) - 1) / 2) * height for n, _, _ in bars], [100 * v for _, v, _ in bars],
                  height=height, xerr=errors, color=COLUMN_COLOURS[column], label=column.replace("_", " "),
                  error_kw={"elinewidth": 1, "capsize": 2})
    axes.set_yticks(range(len(rows)), [label for label, _ in rows])
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel(xlabel)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(frameon=False, fontsize="small", loc="lower right")
