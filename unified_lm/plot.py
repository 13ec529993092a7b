"""Loss curves as a PNG drawn with Pillow (no plotting library needed): total, text and image loss vs step."""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

SERIES = (("loss", (20, 20, 20)), ("text_loss", (31, 119, 180)), ("image_loss", (214, 39, 40)))


def plot_losses(log_path: str | os.PathLike, out: str | os.PathLike, width: int = 640, height: int = 360) -> Path | None:
    """Draw the curves from a training log.jsonl; returns the PNG path, or None when there is nothing to draw."""
    log_path, out = Path(log_path), Path(out)
    if not log_path.exists():
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    points = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None] for key, _ in SERIES}
    values = [v for series in points.values() for _, v in series]
    if not values:
        return None
    left, right, top, bottom = 56, 12, 24, 28
    steps = [s for series in points.values() for s, _ in series]
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
        draw.text((4, xy(first, value)[1] - 6), f"{value:.2f}", fill=(90, 90, 90))
    draw.text((left, height - bottom + 6), f"step {first}", fill=(90, 90, 90))
    draw.text((width - right - 70, height - bottom + 6), f"step {last}", fill=(90, 90, 90))
    legend_x = left + 8
    for key, colour in SERIES:
        series = points[key]
        if len(series) > 1:
            draw.line([xy(s, v) for s, v in series], fill=colour, width=2)
        elif series:
            x, y = xy(*series[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((legend_x, 6), key, fill=colour)
        legend_x += 90
    tmp = out.with_name(f".{out.name}.tmp.png")
    image.save(tmp)
    os.replace(tmp, out)
    return out
