"""Loading a trained unified model for sampling: a run directory (follows `latest`) or one checkpoint directory.

A checkpoint directory holds `model.safetensors`, `config.json`, `meta.json` and `vocab/` (see train.py); nothing
pickled is read. `meta.json["image_grids"]` ("HxW" -> pictures in the training data) says which picture size
the model learned to draw.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vqtok.checkpoint import load_weights

from .config import UnifiedConfig
from .model import UnifiedTransformer
from .vocab import Vocabulary


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
                grids = json.loads(info.read_text()).get("image_grids") or {}
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


def untrained_model(config: UnifiedConfig) -> UnifiedTransformer:
    """The weights training starts from (torch seeded with train.seed, then the model built, as the trainer does
    for ZeRO stages 0-2): the before-training baseline of `unified-lm eval`. With train.encoder_run /
    train.init_from, those weights are loaded over the fresh ones (see `load_initial_weights`)."""
    torch.manual_seed(config.train.seed)
    model = UnifiedTransformer(config.model)
    load_initial_weights(model, config)
    return model


PICTURE_PREFIX = "picture_adapter."


def load_initial_weights(model: UnifiedTransformer, config: UnifiedConfig) -> None:
    """Staged training's starting point: the image encoder of train.encoder_run (an `unified-lm encoder train`
    run), then every weight of train.init_from (a unified_lm run or checkpoint: the language model, which must
    match this config's, and its picture adapter and encoder when it has them). Names and shapes are checked."""
    from safetensors.torch import load_file

    train = config.train
    if train.encoder_run:
        if model.picture_adapter is None:
            raise ValueError("train.encoder_run is set but model.picture.encoder is empty")
        from .vision import load_encoder

        encoder, _ = load_encoder(train.encoder_run)
        model.picture_adapter.encoder.load_state_dict(encoder.vision.state_dict())
    if train.init_from:
        file = resolve_run(train.init_from) / "model.safetensors"
        state = load_file(file)
        expected = model.state_dict()
        language = {name for name in expected if not name.startswith(PICTURE_PREFIX)}
        missing = sorted(language - set(state))
        unexpected = sorted(name for name in state if name not in expected)
        if missing or unexpected:
            raise ValueError(f"train.init_from {file}: weights do not match this model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); the model sections must agree")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"train.init_from {file}: tensor {name} has shape {tuple(tensor.shape)}, this "
                                 f"model expects {tuple(expected[name].shape)}")
        model.load_state_dict(state, strict=False)


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


def resolve_run(path: str | os.PathLike) -> Path:
    """A training run directory (follows RUN/latest) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / "checkpoints" / latest.read_text().strip()
        if (target / "model.safetensors").is_file():
            return target
        raise FileNotFoundError(f"{latest} names {target}, which holds no model.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"unified model checkpoint not found: {path}")
    raise FileNotFoundError(f"{path} is neither a unified_lm run (no 'latest' file) nor a checkpoint directory "
                            "(no model.safetensors)")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    directory = resolve_run(path)
    for name in ("config.json", "meta.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing {name}")
    try:
        config = UnifiedConfig.from_dict(json.loads((directory / "config.json").read_text())).validate()
        meta = json.loads((directory / "meta.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {directory}: bad config/meta JSON ({err})") from None
    vocab = Vocabulary.load(directory / "vocab")
    if config.model.vocab_size != vocab.size:
        raise ValueError(f"{directory / 'config.json'}: model.vocab_size {config.model.vocab_size} does not match "
                         f"the checkpoint's vocabulary ({vocab.size} ids)")
    model = UnifiedTransformer(config.model)
    load_weights(model, directory / "model.safetensors")  # names and shapes checked against config.json
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), vocab, config, directory, meta)
