"""The contrastive image encoder: a ViT picture tower and a small text tower trained into one embedding space.

This is the continuous encoder of the encoder-adapter path: `VisionEncoder(pixels).patches` (B, P, width) is
what an adapter projects into the language model; `ContrastiveModel` is how the encoder is trained (with
SigLIP's sigmoid loss or CLIP's InfoNCE, see losses.py) and measured (zero-shot, see unified_lm/train/encoder.py).

- Picture tower (ViT, Dosovitskiy et al. 2021): a Conv2d with stride = patch size cuts the picture into patches,
  learned position embeddings for the config's grid are added, then pre-norm transformer blocks with
  bidirectional attention and a final LayerNorm. At another resolution the position table is resized by
  bicubic interpolation (ViT section 3.2, "fine-tuning at higher resolution"), so a 48 px-trained encoder
  reads 64 px pictures (a 8x8 grid instead of 6x6); at the native size the table is used as is.
  Pooling: the mean of the patch outputs (`pool="mean"`; ViT appendix D.3 found global average pooling as good
  as a class token), or a learned class token (`pool="cls"`, CLIP's ViT).
- Text tower: token embeddings + learned positions + pre-norm blocks with BIDIRECTIONAL attention under a
  padding mask, pooled by the masked mean over <bos> caption <eos>. Not CLIP's causal tower pooled at <eos>:
  an encoder has no reason to hide later words from earlier ones, and the mean gives every position a direct
  gradient, which matters in a CPU budget of a few hundred steps. It embeds only the text pieces and specials
  (`vocab_size = vocab.image_offset`); image-code ids never enter it.
- Input text = <bos> + encode_text(caption) + <eos>, right-padded with <pad>; a longer caption is cut so <eos>
  stays last (`tokenize_captions`).

Run and checkpoint layout (written by unified_lm/train/encoder.py, read by `load_encoder`): RUN/latest names
`step_XXXXXXXX` under RUN/checkpoints/; a checkpoint holds model.safetensors, config.json, meta.json, vocab/
(and optimizer.safetensors + optimizer.json for resuming). Nothing pickled is read.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runkit.checkpoints import WRONG_KIND, build_with_weights, config_kind, resolve_checkpoint
from runkit.files import read_json
from runkit.typed_config import TypedConfig, out_of_bounds
from unified_lm.tokens.vocab import Vocabulary
from unified_lm.vision.encoder import Block, VisionConfig, VisionEncoder, check_vision, init_weights
from unified_lm.vision.losses import info_nce_loss, sigmoid_loss
from vqtok.images import load_rgb, preprocess

LOSSES = ("siglip", "infonce")
MAX_TEMPERATURE = 100.0  # CLIP clips t at 100 so the InfoNCE logits cannot grow without bound


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class TextTowerConfig:
    vocab_size: int = 0  # ids embedded: text pieces + specials (vocab.image_offset); 0 = from the vocabulary
    pad_id: int = -1  # the vocabulary's <pad>; -1 = from the vocabulary
    width: int = 64  # captions are short and regular: a narrow tower leaves the CPU budget to the ViT
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    max_text_len: int = 64  # tokens including <bos> and <eos>


@dataclass
class EncoderTrainConfig:
    steps: int = 520
    batch_size: int = 64  # SigLIP needs no large batch; at a fixed CPU budget more, smaller steps learned faster
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * min_lr_ratio
    warmup_steps: int = 60
    weight_decay: float = 0.05  # on matrices only (no norms, biases, position tables, temperature, bias)
    beta1: float = 0.9
    beta2: float = 0.98  # CLIP; 0.999 is slow to adapt the temperature
    grad_clip: float = 1.0
    # lr multiplier of log-temperature and bias: Adam moves a scalar by ~lr per step, so at lr 1e-3 SigLIP's
    # t = 10, b = -10 barely move in a few hundred steps (the paper trains for ~100k)
    scalar_lr_scale: float = 100.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0  # zero-shot on the held-out world every N steps (0: only at the end)


@dataclass
class EncoderConfig(TypedConfig):
    name: str = "small"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128
    loss: str = "siglip"  # "siglip" | "infonce"
    train: EncoderTrainConfig = field(default_factory=EncoderTrainConfig)

    CONFIG_NAME = "encoder config"  # errors name "encoder config.FIELD" (TypedConfig: to_dict, to_json, from_dict, ...)

    def for_vocabulary(self, vocab: Vocabulary) -> EncoderConfig:
        """Fill text.vocab_size and text.pad_id from the vocabulary; refuse values that contradict it."""
        expected = {"vocab_size": vocab.image_offset, "pad_id": vocab.special.pad}
        for name, value in expected.items():
            if getattr(self.text, name) not in (0 if name == "vocab_size" else -1, value):
                raise ValueError(f"encoder config text.{name} {getattr(self.text, name)} does not match the "
                                 f"vocabulary ({value}: {vocab.text_size} text pieces + 6 specials)")
        return self.with_overrides({f"text.{name}": value for name, value in expected.items()})

    def validate(self) -> EncoderConfig:
        vision, text, train = self.vision, self.text, self.train
        check_vision(vision, "vision")
        problems = out_of_bounds(self, {"text.vocab_size": (0, 1 << 22), "text.width": (1, 1 << 14),
                                        "text.layers": (1, 256), "text.heads": (1, 256), "text.max_text_len": (2, 1 << 16),
                                        "embed_dim": (1, 1 << 14)})
        if problems:
            raise ValueError("invalid encoder config: " + "; ".join(problems))
        checks = [
            (text.max_text_len >= 2, "text.max_text_len must be >= 2 (<bos> and <eos>)"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (self.embed_dim > 0, "embed_dim must be positive"),
            (train.steps > 0 and train.lr > 0 and train.batch_size >= 2,
             "train.steps and train.lr must be positive, train.batch_size >= 2 (a batch needs negatives)"),
            (0 < train.min_lr_ratio <= 1, "train.min_lr_ratio must be in (0, 1]"),
            (train.warmup_steps >= 0 and train.weight_decay >= 0 and train.grad_clip > 0,
             "train.warmup_steps and train.weight_decay must be >= 0, train.grad_clip > 0"),
            (train.scalar_lr_scale > 0, "train.scalar_lr_scale must be positive"),
            (train.log_every > 0 and train.checkpoint_every > 0 and train.eval_every >= 0,
             "train.log_every and train.checkpoint_every must be positive, train.eval_every >= 0"),
            (train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        ]
        checks += [(text.width % text.heads == 0, f"text.width {text.width} must be divisible by text.heads {text.heads}"),
                   (0 < text.mlp_ratio <= 64, "text.mlp_ratio must be in (0, 64]")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid encoder config: {message}")
        return self


def _tiny() -> EncoderConfig:
    return EncoderConfig("tiny", VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2),
                         TextTowerConfig(width=64, layers=2, heads=2), embed_dim=64,
                         train=EncoderTrainConfig(steps=30, batch_size=32, lr=2e-3, warmup_steps=3, log_every=1,
                                                  checkpoint_every=10))


def _small() -> EncoderConfig:
    return EncoderConfig("small")  # the dataclass defaults: the CPU quickstart (README: ~2 min on 2 cores)


def _base() -> EncoderConfig:
    return EncoderConfig("base", VisionConfig(image_size=64, patch_size=8, width=384, layers=8, heads=6),
                         TextTowerConfig(width=256, layers=6, heads=4), embed_dim=256,
                         train=EncoderTrainConfig(steps=5000, batch_size=512, lr=5e-4, warmup_steps=250,
                                                  weight_decay=0.1, scalar_lr_scale=10.0, log_every=25,
                                                  checkpoint_every=1000, eval_every=1000))


PRESETS = {"tiny": _tiny, "small": _small, "base": _base}


def encoder_preset(name: str) -> EncoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# -----------------------------------------------------------------------------
# Text tower

class TextEncoder(nn.Module):
    def __init__(self, config: TextTowerConfig):
        super().__init__()
        if config.vocab_size <= 0 or config.pad_id < 0:
            raise ValueError("TextEncoder needs text.vocab_size and text.pad_id (EncoderConfig.for_vocabulary)")
        self.config = config
        self.width = config.width
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.position = nn.Parameter(torch.randn(1, config.max_text_len, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.apply(init_weights)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T), right-padded with <pad>, T <= max_text_len -> (B, width): masked mean of the outputs."""
        if ids.ndim != 2 or ids.shape[1] > self.config.max_text_len:
            raise ValueError(f"TextEncoder expects (B, T <= {self.config.max_text_len}) ids, got {tuple(ids.shape)}")
        valid = ids != self.config.pad_id  # (B, T)
        x = self.embed(ids) + self.position[:, : ids.shape[1]]  # (B, T, W)
        mask = valid[:, None, None, :]  # (B, 1, 1, T): every query attends to the caption's tokens only
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        weights = valid.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


def tokenize_captions(vocab: Vocabulary, texts: Sequence[str], max_text_len: int,
                      pad_to: int | None = None) -> torch.Tensor:
    """Captions -> (N, L) int64 ids: <bos> caption <eos> <pad>...; cut to max_text_len keeping <eos> last.

    L is the longest row (at most max_text_len), or `pad_to`."""
    special = vocab.special
    rows = [[special.bos, *vocab.encode_text(text)[: max_text_len - 2], special.eos] for text in texts]
    length = pad_to or max((len(row) for row in rows), default=2)
    ids = torch.full((len(rows), length), special.pad, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
    return ids


# -----------------------------------------------------------------------------
# The two towers trained together

class ContrastiveModel(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.text = TextEncoder(config.text)
        self.image_projection = nn.Linear(config.vision.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.width, config.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=config.vision.width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text.width ** -0.5)
        siglip = config.loss == "siglip"
        # SigLIP section 3.2: t' = log 10, b = -10. CLIP: t = 1/0.07; InfoNCE is shift-invariant, bias unused.
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.bias = nn.Parameter(torch.tensor(-10.0 if siglip else 0.0), requires_grad=siglip)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, E), l2-normalised."""
        return F.normalize(self.image_projection(self.vision(pixels).pooled), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids from `tokenize_captions` -> (B, E), l2-normalised."""
        return F.normalize(self.text_projection(self.text(ids)), dim=-1)

    def clipped_log_temperature(self) -> torch.Tensor:
        if self.config.loss == "infonce":
            return self.log_temperature.clamp(max=math.log(MAX_TEMPERATURE))
        return self.log_temperature

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        """The contrastive loss of a batch of matched (picture, caption) pairs; scalar.

        positives: (B, B) bool of matching pairs; default: pairs whose captions are identical (see losses.py)."""
        images, texts = self.encode_image(pixels), self.encode_text(ids)  # (B, E) each
        if positives is None:
            positives = (ids[:, None, :] == ids[None, :, :]).all(-1)  # (B, B): equal captions match
        if self.config.loss == "siglip":
            return sigmoid_loss(images.float(), texts.float(), self.log_temperature, self.bias, positives)
        return info_nce_loss(images.float(), texts.float(), self.clipped_log_temperature(), positives)


# -----------------------------------------------------------------------------
# Pictures and checkpoints

def pixels_from_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (vqtok.images.to_tensor, batched)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def read_pictures_uint8(paths: Sequence[str | os.PathLike], image_size: int) -> torch.Tensor:
    """Picture files -> (B, S, S, 3) uint8: shorter side resized to image_size, centre-cropped (vqtok's
    preprocessing). A file that cannot be decoded raises vqtok's BadImageError, which names it."""
    if not paths:
        return torch.zeros((0, image_size, image_size, 3), dtype=torch.uint8)
    return torch.from_numpy(np.stack([preprocess(load_rgb(path), image_size) for path in paths]))


def load_pictures(paths: Sequence[str | os.PathLike], image_size: int) -> torch.Tensor:
    """Picture files -> (B, 3, image_size, image_size) float32 in [-1, 1]."""
    return pixels_from_uint8(read_pictures_uint8(paths, image_size))


ENCODER_FILES = ("model.safetensors", "config.json", "vocab/vocab.json")  # what zero-shot eval and training read


def resolve_encoder(path: str | os.PathLike) -> Path:
    """An encoder run directory (its latest complete checkpoint) or a checkpoint directory -> the checkpoint."""
    return resolve_checkpoint(path, ENCODER_FILES, "encoder")


def read_encoder_config(directory: Path) -> EncoderConfig:
    config_path = directory / "config.json"
    data = read_json(config_path, what="encoder checkpoint config")
    if config_kind(data) in ("vqtok", "unified_lm"):
        raise ValueError(f"{directory} is {WRONG_KIND[config_kind(data)]}, not an image-encoder checkpoint")
    try:
        return EncoderConfig.from_dict(data).validate()
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None


def encoder_vocabulary(path: str | os.PathLike) -> Vocabulary:
    """The vocabulary an encoder checkpoint's text tower was trained with (its vocab/ directory)."""
    return Vocabulary.load(resolve_encoder(path) / "vocab")


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ContrastiveModel, EncoderConfig]:
    """A trained ContrastiveModel (eval mode) and its config, from a run directory or a checkpoint directory."""
    directory = resolve_encoder(path)
    config = read_encoder_config(directory)
    vocab = Vocabulary.load(directory / "vocab")
    if (config.text.vocab_size, config.text.pad_id) != (vocab.image_offset, vocab.special.pad):
        raise ValueError(f"{directory / 'config.json'}: text.vocab_size {config.text.vocab_size} / pad_id "
                         f"{config.text.pad_id} do not match the checkpoint's vocabulary ({vocab.image_offset} text "
                         f"and special ids, <pad> {vocab.special.pad})")
    model = build_with_weights(lambda: ContrastiveModel(config), directory / "model.safetensors")
    return model.to(device).eval(), config
