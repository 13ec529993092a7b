"""scripts/bench_kernels.py runs end to end (toy sizes; on CPU the Triton paths run in the interpreter)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_kernels_small_runs_every_section_and_agrees(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts/bench_kernels.py"), "--small", "--out", str(tmp_path)],
                   check=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert (tmp_path / "results.md").read_text().count("### ") == 4
    ours = {row["kernel"]: row for row in results if row["implementation"].startswith("ours")}
    assert set(ours) == {"codebook lookup", "attention", "linear cross-entropy"}
    assert all("error" not in row or row["error"] is None for row in ours.values())
    lookups = [row for row in results
               if row["kernel"] == "codebook lookup" and row["implementation"].startswith("ours")]
    assert all(row["agreement"] == 1.0 for row in lookups)
    losses = {row["implementation"]: row["loss"] for row in results if row["kernel"] == "linear cross-entropy"}
    assert abs(losses["ours (fused Triton)"] - losses["PyTorch logits + cross_entropy + z-loss"]) < 1e-4
    encode = [row for row in results if row["kernel"] == "vqtok encode"]
    assert len(encode) == 2 and all(row["encode_ms"] > 0 for row in encode)
