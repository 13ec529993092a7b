"""The README's main command end to end at the `ci` preset: every stage runs, the report holds every task with its
baselines, a re-run reuses every stage."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reduced_loop_end_to_end_writes_the_report(tmp_path):
    """The README's main command at the `ci` preset: every stage runs (2-process DeepSpeed training included),
    the report holds every task with its baselines, and a re-run reuses every stage."""
    out = tmp_path / "quickstart"
    command = [sys.executable, str(REPO / "scripts" / "quickstart.py"), "--preset", "ci", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "eval" / "eval.json").read_text())
    results = report["results"]
    for task in ("text_to_image", "image_to_text", "qa", "interleaved"):
        assert set(results[task]) == {"trained", "before_training", "chance"}, task
        key = "accuracy" if task == "qa" else "colour_shape"
        assert all(0.0 <= results[task][column][key] <= 1.0 for column in results[task])
    assert results["text"]["trained"]["perplexity"] > 1 and results["text"]["chance"]["perplexity"] > 1
    assert results["tokenizer_photos"]["trained"]["psnr"] > 0 and "checker" in results["tokenizer_world"]["trained"]
    page = (out / "eval" / "index.html").read_text()
    for needle in ("What the model learned", "before training", "Training curves", "(held-out captions)",
                   "held-out photos", "data:image/png;base64", "sampled image documents",
                   "Picture understanding: discrete codes vs continuous features"):
        assert needle in page, needle
    assert (out / "eval" / "report.png").stat().st_size > 1000
    assert len(list((out / "eval" / "pictures").glob("text_to_image-*.png"))) == 4
    assert "THE REPORT" in result.stdout
    understanding = json.loads((out / "understanding" / "understanding.json").read_text())["models"]
    assert {name: m["path"] for name, m in understanding.items()} == {
        "before": "discrete", "discrete": "discrete", "continuous": "continuous"}
    assert all(0.0 <= m["qa"]["accuracy"] <= 1.0 and m["text"]["perplexity"] > 1 for m in understanding.values())
    assert all(m["fine_detail"]["questions"] > 0 for m in understanding.values())
    assert (out / "encoder" / "zero_shot.json").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("== lm:", "== eval:", "== sample image:", "== vocab:", "== prepare", "== encoder:",
                  "== lm_stage1:", "== lm_continuous:", "== lm_discrete:", "== understand:"):
        assert stage not in again.stdout, f"{stage} ran again on a finished quickstart"
