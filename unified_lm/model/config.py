"""Typed configuration for the unified transformer and its training, with named presets in one registry.

Presets (model shape; `vocab_size` is always taken from the vocabulary at training time):
- `tiny`   tests: 2 layers, width 64.
- `small`  the CPU quickstart: 4 layers, width 256, sequence 512.
- `350m`   GPU throughput/MFU runs: 24 layers, width 1024, 16 heads (4 KV), sequence 2048.
- `1b`     sampling-speed runs on one GPU: 22 layers, width 2048, 16 heads (4 KV); ~1.0B parameters with a 12k vocabulary.
- `7b`     Chameleon-7B's shape (32 layers, width 4096, 32 heads, sequence 4096, QK-norm, z-loss, dropout 0.1).
Chameleon-34B additionally used norm reordering (`norm_reordering=True`). `tiny`, `small`, `350m` and `1b` learn
image position embeddings (`image_positions`: up to 32x32 codes per picture, 16x16 for `tiny`); `7b` keeps
Chameleon's layout without them.
Overrides (`--set model.n_layers=8`, or a JSON file {"preset": "small", ...}) reject unknown keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runkit.typed_config import TypedConfig, build_dataclass, load_preset_or_file, out_of_bounds

# Sizes a config may ask for, checked before anything is built from it (a crafted checkpoint's config.json must
# fail here, not in the allocator): generous for real models (Chameleon-34B has 48 layers, width 8192).
MODEL_BOUNDS = {"model.vocab_size": (0, 1 << 22), "model.dim": (1, 1 << 16), "model.n_layers": (1, 1024),
                "model.n_heads": (1, 1024), "model.n_kv_heads": (1, 1024), "model.ffn_hidden": (0, 1 << 20),
                "model.max_seq_len": (1, 1 << 20), "model.picture.pool": (1, 64), "model.picture.adapter_hidden": (0, 1 << 16),
                "model.image_positions": (0, 1 << 16)}
ROPE_TABLE_LIMIT = 1 << 27  # max_seq_len * head_dim: the RoPE cache (cos and sin, float32) stays under 1 GB


@dataclass
class PictureConfig:
    """The continuous encoder-adapter path (understanding): a ViT's patch features, average-pooled by `pool`,
    through a 2-layer MLP (GELU) to the model width, replace the embeddings of `<image>` placeholders."""

    encoder: dict = field(default_factory=dict)  # the image encoder's VisionConfig; {} = no continuous path
    pool: int = 1  # average-pool the patch grid by this factor: pool^2 fewer placeholders per picture
    adapter_hidden: int = 0  # the MLP's hidden width; 0 = the model width


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = take it from the vocabulary; otherwise it must equal the vocabulary's size
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: each KV head serves n_heads / n_kv_heads query heads
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 512  # RoPE table length, tokens
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True  # Chameleon: LayerNorm over head_dim on q and k, before RoPE
    qk_norm_eps: float = 0.0  # the QK LayerNorm's eps; 0 = norm_eps (transformers' Chameleon: always 1e-5)
    norm_reordering: bool = False  # Chameleon-34B: h = x + norm(attn(x)); out = h + norm(ffn(h))
    dropout: float = 0.0  # residual and attention dropout (Chameleon-7B: 0.1)
    tied_embeddings: bool = False
    init_std: float = 0.02
    z_loss_weight: float = 1e-5  # z_loss_weight * log(Z)^2 per token (Chameleon: 1e-5)
    # learned embeddings of a code's place in its picture (raster index; DALL-E's image position embeddings,
    # flattened), added to the codes' token embeddings, for pictures of up to this many codes; 0 = none, as in
    # Chameleon, whose 1-D RoPE leaves the model to count its way through a picture
    image_positions: int = 0
    picture: PictureConfig = field(default_factory=PictureConfig)  # continuous path; filled from train.encoder_run

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_hidden or 64 * -(-(8 * self.dim // 3) // 64)

    def check_picture_grid(self, height: int, width: int, where: str) -> None:
        """A picture of height x width codes needs an image position embedding per code (when the model has
        them): ValueError naming `where` otherwise."""
        codes = height * width
        if self.image_positions and codes > self.image_positions:
            raise ValueError(f"{where}: a {height}x{width} picture has {codes} codes but model.image_positions is "
                             f"{self.image_positions}; raise it to at least {codes}")


@dataclass
class TrainConfig:
    seq_len: int = 512  # tokens per packed training sequence (inputs; the stored rows hold seq_len + 1)
    micro_batch_size: int = 8  # sequences per process per micro-step
    grad_accum_steps: int = 1
    steps: int = 300  # optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 30
    schedule: str = "cosine"  # "cosine" | "chameleon" (linear warm-up, then exponential decay) | "constant"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    stats_every: int = 50  # per-layer max |q.k| logit and output norms (costs an extra look at attention scores)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Staged training (LLaVA): stage 1 trains the adapter only (freeze_lm), stage 2 the adapter and the model
    # (the encoder frozen unless encoder_lr_scale > 0). Frozen parameters get no optimizer state.
    init_from: str = ""  # a unified_lm run/checkpoint whose weights start this run (its picture path too, if any)
    encoder_run: str = ""  # an `unified-lm encoder train` run: its image encoder starts the continuous path
    freeze_lm: bool = False  # train only the picture adapter (stage 1)
    encoder_lr_scale: float = 0.0  # the image encoder's lr = train.lr * this; 0 = frozen


@dataclass
class UnifiedConfig(TypedConfig):
    name: str = "small"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # to_dict, to_json, from_dict, with_overrides: TypedConfig's

    def validate(self) -> UnifiedConfig:
        model, train = self.model, self.train
        problems = out_of_bounds(self, MODEL_BOUNDS)
        if problems:  # the checks below assume positive sizes
            raise ValueError("invalid unified_lm config: " + "; ".join(problems))
        checks = [
            (model.dim % model.n_heads == 0, f"model.dim {model.dim} must be divisible by model.n_heads {model.n_heads}"),
            (model.head_dim % 2 == 0, f"head_dim {model.head_dim} must be even for RoPE"),
            (model.max_seq_len * model.head_dim <= ROPE_TABLE_LIMIT,
             f"model.max_seq_len {model.max_seq_len} x head_dim {model.head_dim} exceeds {ROPE_TABLE_LIMIT} (RoPE table)"),
            (model.n_heads % model.n_kv_heads == 0, f"model.n_heads {model.n_heads} must be a multiple of model.n_kv_heads {model.n_kv_heads}"),
            (0.0 <= model.dropout < 1.0, f"model.dropout must be in [0, 1), got {model.dropout}"),
            (model.z_loss_weight >= 0, "model.z_loss_weight must be >= 0"),
            (model.vocab_size >= 0, "model.vocab_size must be >= 0 (0 = from the vocabulary)"),
            (train.seq_len <= model.max_seq_len, f"train.seq_len {train.seq_len} exceeds model.max_seq_len {model.max_seq_len}"),
            (train.micro_batch_size > 0 and train.grad_accum_steps > 0, "train.micro_batch_size and train.grad_accum_steps must be positive"),
            (train.steps > 0 and train.lr > 0, "train.steps and train.lr must be positive"),
            (train.schedule in ("cosine", "chameleon", "constant"), f"train.schedule must be cosine, chameleon or constant, got {train.schedule!r}"),
            (0.0 < train.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in (0, 1]"),
            (train.log_every > 0 and train.checkpoint_every > 0 and train.stats_every > 0, "train.log_every, stats_every and checkpoint_every must be positive"),
            (train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1 (the newest checkpoint is never deleted)"),
            (model.picture.pool >= 1, f"model.picture.pool must be >= 1, got {model.picture.pool}"),
            (train.encoder_lr_scale >= 0, "train.encoder_lr_scale must be >= 0 (0 = frozen encoder)"),
            (model.norm_eps > 0 and model.qk_norm_eps >= 0 and model.init_std > 0 and model.rope_theta > 1,
             "model.norm_eps and model.init_std must be positive, model.qk_norm_eps >= 0, model.rope_theta > 1"),
            (train.seq_len > 0 and train.warmup_steps >= 0 and train.grad_clip > 0,
             "train.seq_len and train.grad_clip must be positive, train.warmup_steps >= 0"),
            (not train.freeze_lm or bool(model.picture.encoder or train.encoder_run),
             "train.freeze_lm trains the picture adapter only, but there is none (set train.encoder_run)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid unified_lm config: {message}")
        if model.picture.encoder:
            from unified_lm.vision.encoder import VisionConfig, check_vision

            check_vision(build_dataclass(VisionConfig, model.picture.encoder, "model.picture.encoder"),
                         "model.picture.encoder")
        return self


def _tiny() -> UnifiedConfig:
    return UnifiedConfig("tiny", ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                                             image_positions=256),
                         TrainConfig(seq_len=64, micro_batch_size=4, steps=20, lr=3e-3, warmup_steps=2, log_every=1,
                                     stats_every=5, checkpoint_every=10))


def _small() -> UnifiedConfig:
    return UnifiedConfig("small", ModelConfig(image_positions=1024), TrainConfig())


def _350m() -> UnifiedConfig:
    return UnifiedConfig("350m", ModelConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=4096,
                                           image_positions=1024),
                         TrainConfig(seq_len=2048, micro_batch_size=8, steps=1000, lr=3e-4, warmup_steps=100,
                                     log_every=10, stats_every=100, checkpoint_every=500))


def _1b() -> UnifiedConfig:
    return UnifiedConfig("1b", ModelConfig(dim=2048, n_layers=22, n_heads=16, n_kv_heads=4, max_seq_len=4096,
                                         image_positions=1024),
                         TrainConfig(seq_len=4096, micro_batch_size=4, steps=10_000, lr=3e-4, warmup_steps=500,
                                     log_every=10, stats_every=100, checkpoint_every=1000))


def _7b() -> UnifiedConfig:
    return UnifiedConfig("7b", ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_hidden=11008,
                                           max_seq_len=4096, dropout=0.1),
                         TrainConfig(seq_len=4096, micro_batch_size=1, steps=100_000, lr=1e-4, warmup_steps=4000,
                                     schedule="chameleon", log_every=10, stats_every=100, checkpoint_every=1000))


PRESETS = {"tiny": _tiny, "small": _small, "350m": _350m, "1b": _1b, "7b": _7b}


def preset(name: str) -> UnifiedConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown unified_lm preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(name_or_path: str) -> UnifiedConfig:
    """A preset name, or a JSON file holding a full config or {"preset": NAME, ...overrides}."""
    return load_preset_or_file(name_or_path, PRESETS, UnifiedConfig.from_dict, "--model").validate()
