"""The dependency rule of ARCHITECTURE.md, checked by import-linter's contracts (pyproject.toml): the code keeps it,
and a wrong-way import put into a copy of the code breaks it, naming the chain."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runkit", "kernels", "vqtok", "unified_lm")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the packages under `root`, with `root`'s pyproject.toml, imported from `root` only."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def code_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("code")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_code_keeps_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, wrong_import, contract", [
    # a lower layer importing a higher one
    ("unified_lm/tokens/vocab.py", "import unified_lm.generate.sampler", "unified_lm's layers"),
    # siblings in one layer do not import each other
    ("unified_lm/train/plot.py", "import unified_lm.generate.render", "unified_lm's layers"),
    # the model reaching for the tokenizer, indirectly through a helper of its own package
    ("unified_lm/model/adapter.py", "import vqtok.images", "the model is only a model"),
    # the model reaching for DeepSpeed
    ("unified_lm/model/transformer.py", "import deepspeed", "the model is only a model"),
    # vqtok importing unified_lm
    ("vqtok/images.py", "import unified_lm.tokens.vocab", "packages"),
    # kernels importing anything of ours
    ("kernels/dispatch.py", "import runkit.files", "packages"),
])
def test_a_constructed_violation_is_caught(code_copy, module, wrong_import, contract):
    path = code_copy / module
    original = path.read_text()
    path.write_text(original + f"\n{wrong_import}  # constructed violation\n")
    try:
        result = lint_imports(code_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, result.stdout[-3000:]
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout[-3000:]
    assert module.removesuffix(".py").replace("/", ".") in broken  # the report names the importing module
