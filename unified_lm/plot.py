"""Training curves as PNGs drawn with Pillow (no plotting library needed).

`plot_losses` draws total, text and image loss (redrawn by the trainer at each checkpoint); `plot_training_curves`
adds the z-loss and mean log Z panels (the signals of logit drift) for the evaluation report.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

LOSS_SERIES = (("loss", (20, 20, 20)), ("text_loss", (31, 119, 180)), ("image_loss", (214, 39, 40)))
CURVES = {  # file stem -> the log.jsonl keys drawn in it
    "loss": LOSS_SERIES,
    "z_loss": (("z_loss", (148, 103, 189)),),
    "log_z": (("log_z", (44, 160, 44)),),
}


def read_log(log_path: str | os.PathLike) -> list[dict]:
    log_path = Path(log_path)
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def plot_series(records: list[dict], series: tuple, out: str | os.PathLike, width: int = 640,
                height: int = 360) -> Path | None:
    """Draw `series` ((key, RGB), ...) against "step"; returns the PNG path, or None when there is nothing to draw."""
    out = Path(out)
    points = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None] for key, _ in series}
    values = [v for line in points.values() for _, v in line]
    if not values:
        return None
    left, right, top, bottom = 64, 12, 24, 28
    steps = [s for line in points.values() for s, _ in line]
    first, last = min(steps), max(max(steps), min(steps) + 1)
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        y = height - bottom - (value - low) / (high - low) * (height - top - bottom)
        return x, y

    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        draw.text((4, xy(first, value)[1] - 6), f"{value:.3g}", fill=(90, 90, 90))
    draw.text((left, height - bottom + 6), f"step {first}", fill=(90, 90, 90))
    draw.text((width - right - 70, height - bottom + 6), f"step {last}", fill=(90, 90, 90))
    legend_x = left + 8
    for key, colour in series:
        line = points[key]
        if len(line) > 1:
            draw.line([xy(s, v) for s, v in line], fill=colour, width=2)
        elif line:
            x, y = xy(*line[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((legend_x, 6), key, fill=colour)
        legend_x += 90
    tmp = out.with_name(f".{out.name}.tmp.png")
    image.save(tmp)
    os.replace(tmp, out)
    return out


def plot_losses(log_path: str | os.PathLike, out: str | os.PathLike, width: int = 640, height: int = 360) -> Path | None:
    """Total, text and image loss from a training log.jsonl; returns the PNG path, or None when there is nothing."""
    return plot_series(read_log(log_path), LOSS_SERIES, out, width, height)


def plot_training_curves(log_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """OUT_DIR/{loss,z_loss,log_z}.png from a training log.jsonl; returns the ones drawn."""
    records = read_log(log_path)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    drawn = {name: plot_series(records, series, Path(out_dir) / f"{name}.png") for name, series in CURVES.items()}
    return {name: path for name, path in drawn.items() if path is not None}
