"""Loading a trained unified model for sampling: a run directory (follows `latest`) or one checkpoint directory.

A checkpoint directory holds `model.safetensors`, `config.json`, `meta.json` and `vocab/` (see unified_lm/train/trainer.py); nothing
pickled is read. `meta.json["image_grids"]` ("HxW" -> pictures in the training data) says which picture size
the model learned to draw.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from runkit.checkpoints import WRONG_KIND, build_with_weights, config_kind, resolve_checkpoint
from runkit.files import confined, read_json
from unified_lm.model.config import UnifiedConfig
from unified_lm.model.transformer import UnifiedTransformer
from unified_lm.tokens.vocab import Vocabulary


@dataclass
class LoadedModel:
    model: UnifiedTransformer  # eval mode, on the requested device and dtype
    vocab: Vocabulary
    config: UnifiedConfig
    directory: Path  # the checkpoint directory the weights came from
    meta: dict

    @property
    def image_grids(self) -> dict[str, int]:
        """"HxW" -> pictures of that grid in the training data (from meta.json, else the run's dataset.json)."""
        grids = dict(self.meta.get("image_grids") or {})
        if not grids:  # checkpoints from before grids were recorded: look at the dataset they were trained on
            info = Path(str(self.meta.get("dataset", ""))) / "dataset.json"
            if info.is_file():
                try:
                    grids = read_json(info).get("image_grids") or {}
                except ValueError:
                    grids = {}
        return grids

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """The grid most training pictures had: what the model learned to draw (None: trained on no pictures)."""
        grids = self.image_grids
        return parse_grid(max(grids, key=grids.get)) if grids else None


def parse_grid(text: str) -> tuple[int, int]:
    """"8x8" -> (8, 8)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a picture grid is HxW (e.g. 8x8), got {text!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"a picture grid must be positive, got {text!r}")
    return height, width


def write_model_files(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: UnifiedConfig,
                      vocab: Vocabulary, meta: dict) -> Path:
    """The shareable part of a checkpoint: model.safetensors, config.json, meta.json, vocab/."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(config.to_json())
    vocab.save(directory / "vocab")
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    return directory


MODEL_FILES = ("model.safetensors", "config.json", "meta.json", "vocab/vocab.json")  # what sampling reads


def resolve_run(path: str | os.PathLike) -> Path:
    """A training run directory (its latest complete checkpoint; see runkit.checkpoints.choose_checkpoint) or a
    checkpoint directory -> the checkpoint directory."""
    return resolve_checkpoint(path, MODEL_FILES, "unified_lm")


def read_config(directory: Path) -> UnifiedConfig:
    """A checkpoint's config.json, validated; a tokenizer's or encoder's checkpoint is named as such."""
    data = read_json(directory / "config.json", what="checkpoint config")
    if config_kind(data) in ("vqtok", "encoder"):
        raise ValueError(f"{directory} is {WRONG_KIND[config_kind(data)]}, not a unified_lm model (a tokenizer goes to "
                         "--tokenizer)")
    try:
        return UnifiedConfig.from_dict(data).validate()
    except ValueError as err:
        raise ValueError(f"{directory / 'config.json'}: {err}") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model of a run or checkpoint directory; names and shapes of its weights are checked against
    config.json (from the safetensors header, on the meta device) before the model is built."""
    directory = resolve_run(path)
    config = read_config(directory)
    meta = read_json(directory / "meta.json", what="checkpoint metadata")
    vocab = Vocabulary.load(directory / "vocab")
    if config.model.vocab_size != vocab.size:
        raise ValueError(f"{directory / 'config.json'}: model.vocab_size {config.model.vocab_size} does not match "
                         f"the checkpoint's vocabulary ({vocab.size} ids)")
    model = build_with_weights(lambda: UnifiedTransformer(config.model), directory / "model.safetensors")
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), vocab, config, directory, meta)


def tokenizer_path(loaded: LoadedModel) -> Path | None:
    """The tokenizer an imported checkpoint carries (meta.json "tokenizer_path", inside its directory)."""
    name = loaded.meta.get("tokenizer_path")
    return confined(loaded.directory, name, f"{loaded.directory / 'meta.json'} tokenizer_path") if name else None
