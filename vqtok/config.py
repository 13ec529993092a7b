"""Typed configuration for the VQ tokenizer, with named presets in one registry.

`chameleon` reproduces the shape of Chameleon's image tokenizer (Make-A-Scene VQGAN): 512x512 RGB -> 32x32 grid,
codebook 8192 x 256, base channels 128, channel multipliers (1, 1, 2, 2, 4) i.e. downsampling factor 16.
`small` is what trains usefully on a CPU in minutes; `tiny` exists for tests. A variant is a derived preset
(`dataclasses.replace`), not a new flag. Overrides from JSON or the CLI reject unknown keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from runkit.typed_config import TypedConfig, load_preset_or_file, out_of_bounds

# Sizes a config may ask for, checked before anything is built from it: a crafted checkpoint's config.json fails
# here, not in the allocator (Chameleon's tokenizer: 512 px, 5 levels, codebook 8192 x 256).
BOUNDS = {"model.resolution": (1, 8192), "model.in_channels": (1, 16), "model.base_channels": (1, 4096),
          "model.channel_multipliers": (1, 64), "model.num_res_blocks": (0, 16), "model.z_channels": (1, 4096),
          "model.num_groups": (1, 4096), "quantizer.codebook_size": (2, 1 << 20), "quantizer.embed_dim": (1, 4096),
          "quantizer.codebook_dim": (1, 4096), "quantizer.kmeans_iters": (0, 1000), "loss.discriminator_layers": (0, 8),
          "loss.discriminator_channels": (1, 4096), "train.crop_size": (1, 8192), "train.batch_size": (1, 1 << 16),
          "train.usage_window": (1, 1 << 26), "train.num_workers": (0, 256), "quantizer.fsq_levels": (2, 1 << 16),
          "train.quantizer_warmup_steps": (0, 1 << 40)}
MAX_LEVELS = 8  # len(model.channel_multipliers): 2^7 = 128x downsampling; also the most FSQ dimensions

@dataclass
class ModelConfig:
    """The convolutional encoder/decoder (taming-transformers' VQGAN layout)."""

    resolution: int = 256  # side of the square image the tokenizer sees at encode time, pixels
    in_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per resolution level
    num_res_blocks: int = 2
    z_channels: int = 256  # encoder output width before the quantizer
    attention_at_lowest: bool = True  # self-attention block(s) at the lowest resolution
    dropout: float = 0.0
    num_groups: int = 32  # GroupNorm groups (capped by channel count)
    # False: an encoder-only tokenizer (transformers' ChameleonVQVAE ships no decoder): it encodes, never draws
    has_decoder: bool = True
    # picture preprocessing: "auto" = bicubic when enlarging, Lanczos when shrinking; "lanczos" = Lanczos both
    # ways (Chameleon's own preprocessing)
    resample: str = "auto"
    # "image": the encoder sees the whole picture (VQGAN); "patch": each downsample_factor-sized patch is encoded
    # on its own, so a code is a function of its patch's pixels only (see vqtok/model.py)
    encoder_context: str = "image"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Tokens per side for a `resolution`-sized image."""
        return self.resolution // self.downsample_factor


@dataclass
class QuantizerConfig:
    """The quantizer, from vector-quantize-pytorch.

    kind "vq" (VectorQuantize, a learned codebook):
    - plain VQ: codebook learned by gradient, no EMA (`ema=False`); vector-quantize-pytorch then applies
      `commitment_weight * ||z - q||^2` with gradients to both the encoder and the codebook;
    - EMA + k-means init + dead-code revival (`ema=True, kmeans_init=True, dead_code_threshold>0`);
    - LlamaGen's l2-normalised low-dimensional lookup (`codebook_dim=8, l2_normalized=True`).
    kind "fsq" (finite scalar quantization, Mentzer et al. 2023): each of len(fsq_levels) latent dimensions is
    bounded and rounded to fsq_levels[i] values; the codebook is the grid, codebook_size = prod(fsq_levels). It
    cannot collapse and has no codebook to revive; a code is the rounding of the latent, so equal latents always
    give equal codes.
    """

    kind: str = "vq"  # vq | fsq
    fsq_levels: tuple[int, ...] = ()  # kind "fsq": levels per dimension, e.g. (8, 5, 5, 5) = 1000 codes
    codebook_size: int = 8192
    embed_dim: int = 256  # width of the quantized latent fed to the decoder
    codebook_dim: int | None = None  # low-dim lookup space (LlamaGen: 8); None = embed_dim, no projection
    l2_normalized: bool = False  # cosine-similarity lookup on l2-normalised codes
    ema: bool = True  # EMA codebook updates; False = codebook learned by gradient (codebook loss)
    ema_decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    # Codes whose EMA cluster size (expected assignments per step) falls below this are revived from the batch
    # (0 = off). Must sit well below tokens_per_step / codebook_size, or every code is "dead" every step.
    dead_code_threshold: float = 2.0
    # what a revived code starts from: "batch" (vector-quantize-pytorch: random latents of the batch; in pictures
    # where one content dominates, mostly copies of it, which then split that content between near-equal codes)
    # or "worst" (the batch's latents the live codes fit worst: contents still sharing a code get one of their own;
    # one process only: data-parallel training keeps the library's cross-rank sampler)
    revive_from: str = "batch"
    commitment_weight: float = 0.25


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0  # LPIPS; silently 0 (with one warning) when no trunk weights exist
    lpips_net: str = "vgg"
    lpips_weights: str | None = None  # path to the trunk's torchvision state dict; else the torch hub cache
    adversarial_weight: float = 0.0  # 0 disables the PatchGAN discriminator
    adversarial_start: int = 10_000  # step at which the discriminator starts (delayed start)
    discriminator_layers: int = 3
    discriminator_channels: int = 64
    adaptive_weight_max: float = 1e4


@dataclass
class TrainConfig:
    batch_size: int = 8
    crop_size: int = 256  # training crops, pixels (the model is fully convolutional)
    scale_range: tuple[float, float] = (1.0, 1.5)  # shorter side resized to resolution * U(range) before the crop
    permute_channels: bool = False  # random RGB channel order per crop (colour augmentation for small photo sets)
    lr: float = 1e-4
    discriminator_lr: float | None = None  # None = lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio over `steps` (1.0 = constant)
    grad_clip: float = 1.0
    steps: int = 1000
    seed: int = 0
    # steps trained as a plain autoencoder (the quantizer bypassed) before quantizing; the codebook is then
    # k-means-initialised on the trained latents. 0 = quantize from the first step.
    quantizer_warmup_steps: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    sample_every: int = 500
    keep_checkpoints: int = 2
    usage_window: int = 65_536  # rolling window of code indices for usage / perplexity
    num_workers: int = 0
    bf16_on_cuda: bool = True


@dataclass
class VQConfig(TypedConfig):
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    JSON_SORT_KEYS = True  # config.json lists the fields sorted (TypedConfig: to_dict, to_json, from_dict, with_overrides)

    def validate(self) -> VQConfig:
        m, q, t = self.model, self.quantizer, self.train
        problems = out_of_bounds(self, BOUNDS)
        if not 1 <= len(m.channel_multipliers) <= MAX_LEVELS:
            problems.append(f"model.channel_multipliers must hold 1 to {MAX_LEVELS} levels, got {len(m.channel_multipliers)}")
        if q.kind == "fsq" and not 1 <= len(q.fsq_levels) <= MAX_LEVELS:
            problems.append(f"quantizer.fsq_levels must hold 1 to {MAX_LEVELS} levels per dimension, got {list(q.fsq_levels)}")
        if problems:  # the checks below assume sizes in range
            raise ValueError("invalid vqtok config: " + "; ".join(problems))
        if m.resolution % m.downsample_factor:
            problems.append(f"model.resolution={m.resolution} is not a multiple of the downsample factor {m.downsample_factor}")
        if t.crop_size % m.downsample_factor:
            problems.append(f"train.crop_size={t.crop_size} is not a multiple of the downsample factor {m.downsample_factor}")
        if m.resample not in ("auto", "lanczos"):
            problems.append(f"model.resample={m.resample!r} must be 'auto' or 'lanczos'")
        if t.steps < 0 or t.log_every < 1 or t.checkpoint_every < 1 or t.sample_every < 1 or t.keep_checkpoints < 1:
            problems.append("train.steps must be >= 0; train.log_every, checkpoint_every, sample_every and "
                            "keep_checkpoints >= 1")
        if not (0 <= m.dropout < 1 and 0 < q.ema_decay < 1 and t.lr > 0):
            problems.append("model.dropout must be in [0, 1), quantizer.ema_decay in (0, 1), train.lr > 0")
        if m.encoder_context not in ("image", "patch"):
            problems.append(f"model.encoder_context={m.encoder_context!r} must be 'image' or 'patch'")
        if q.revive_from not in ("batch", "worst"):
            problems.append(f"quantizer.revive_from={q.revive_from!r} must be 'batch' or 'worst'")
        if q.kind not in ("vq", "fsq"):
            problems.append(f"quantizer.kind={q.kind!r} must be 'vq' or 'fsq'")
        if q.kind == "fsq" and math.prod(q.fsq_levels) != q.codebook_size:
            problems.append(f"quantizer.codebook_size={q.codebook_size} must equal the product of quantizer.fsq_levels "
                            f"{list(q.fsq_levels)} = {math.prod(q.fsq_levels)}")
        if problems:
            raise ValueError("invalid vqtok config: " + "; ".join(problems))
        return self


def _chameleon() -> VQConfig:
    return VQConfig(
        name="chameleon",
        model=ModelConfig(resolution=512, base_channels=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
                          z_channels=256),
        # 8 crops x 16x16 tokens = 2048 assignments per step: 0.25 per code, so revive below 0.04.
        quantizer=QuantizerConfig(codebook_size=8192, embed_dim=256, dead_code_threshold=0.04),
        loss=LossConfig(adversarial_weight=0.1, adversarial_start=20_000),
        train=TrainConfig(batch_size=8, crop_size=256, lr=1e-4, steps=100_000, checkpoint_every=2000,
                          sample_every=1000),
    )


def _small() -> VQConfig:
    # f8 (three downsamplings): 256x256 -> 32x32 tokens, Chameleon's grid at half its resolution; narrow enough
    # to train on a CPU. Quantizer: EMA + k-means init + dead-code revival in the 64-d latent space, which gave
    # the best held-out PSNR of the three settings in docs/benchmarks.md with ~98% of the 8192 codes in use.
    # 8 crops x 8x8 tokens = 512 assignments per step over 8192 codes (0.0625 per code on average), so the
    # EMA decays fast (0.9) and the revival threshold sits at a sixth of the average.
    return VQConfig(
        name="small",
        model=ModelConfig(resolution=256, base_channels=32, channel_multipliers=(1, 2, 2, 4), num_res_blocks=1,
                          z_channels=64, num_groups=8),
        quantizer=QuantizerConfig(codebook_size=8192, embed_dim=64, ema=True, ema_decay=0.9, kmeans_init=True,
                                  dead_code_threshold=0.01),
        loss=LossConfig(lpips_net="vgg"),
        train=TrainConfig(batch_size=8, crop_size=64, scale_range=(1.0, 2.0), permute_channels=False, lr=3e-4,
                          warmup_steps=25, steps=1500, log_every=25, checkpoint_every=250, sample_every=250),
    )


def _tiny() -> VQConfig:
    return VQConfig(
        name="tiny",
        model=ModelConfig(resolution=32, base_channels=16, channel_multipliers=(1, 2), num_res_blocks=1,
                          z_channels=16, num_groups=4),
        quantizer=QuantizerConfig(codebook_size=64, embed_dim=16, codebook_dim=4, l2_normalized=True,
                                  kmeans_init=False, dead_code_threshold=0.5),
        loss=LossConfig(perceptual_weight=0.0),
        train=TrainConfig(batch_size=4, crop_size=32, lr=1e-3, steps=20, log_every=1, checkpoint_every=10,
                          sample_every=10, usage_window=1024),
    )


PRESETS = {"chameleon": _chameleon, "small": _small, "tiny": _tiny}


def preset(name: str) -> VQConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown vqtok preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(name_or_path: str) -> VQConfig:
    """A preset name, or a JSON file holding a full config or {"preset": NAME, ...overrides}."""
    return load_preset_or_file(name_or_path, PRESETS, VQConfig.from_dict, "--config").validate()
