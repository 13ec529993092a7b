"""Sampling settings and the per-step logit arithmetic of the sampler: penalties, top-k/top-p, guidance, draws.

Everything here works on a batch of rows at once with per-row settings, because one batch mixes rows that are
writing text with rows that are drawing a picture, and each modality has its own temperature, top-k and top-p.

Draws use one exponential noise vector per row per step from that row's own generator (the exponential race:
argmax(p / E) with E ~ Exp(1) is a sample of p), so a prompt gives the same document alone or in any batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from runkit.typed_config import apply_overrides, build_dataclass

MODES = ("interleaved", "text", "image", "understanding")
GUIDANCE = ("none", "2way", "3way")


@dataclass
class ModalitySampling:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = off
    repetition_penalty: float = 1.0  # text only (CTRL): seen tokens' logits / p if positive, * p if negative


@dataclass
class Guidance:
    """Classifier-free guidance for image tokens (applied to logits, before the modality mask and top-k/top-p).

    2way: uncond + scale * (cond - uncond), with uncond the context [<bos>, <boi>].
    3way (Chameleon): uncond + image_scale * (image_only - uncond) + scale * (full - image_only), where
          image_only is the document so far with every text token removed.
    """

    mode: str = "none"  # none | 2way | 3way
    scale: float = 3.0  # 2way scale; 3way text scale (Chameleon: 3.0)
    image_scale: float = 1.2  # 3way image scale (Chameleon: 1.2)

    @property
    def contexts(self) -> int:
        """Rows run per prompt: the full context plus the guidance contexts."""
        return GUIDANCE.index(self.mode) + 1


@dataclass
class SamplingConfig:
    mode: str = "interleaved"  # interleaved | text | image (text -> one picture) | understanding (pictures -> text)
    max_new_tokens: int = 256  # generated tokens per document, pictures included (a picture is grid + 2 tokens)
    max_images: int = 4  # pictures per document (interleaved mode)
    seed: int = 0  # prompt i draws from a generator seeded with seed + i
    text: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=0.7, top_p=0.9))
    image: ModalitySampling = field(default_factory=lambda: ModalitySampling(temperature=1.0))
    guidance: Guidance = field(default_factory=Guidance)

    @classmethod
    def from_dict(cls, data: dict) -> SamplingConfig:
        """Fields missing from `data` keep this class's defaults, nested ones included."""
        return build_dataclass(cls, apply_overrides(cls().to_dict(), data), "sampling").validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> SamplingConfig:
        checks = [
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.max_new_tokens > 0, f"max_new_tokens must be positive, got {self.max_new_tokens}"),
            (self.max_images >= 0, f"max_images must be >= 0, got {self.max_images}"),
            (self.guidance.mode in GUIDANCE, f"guidance.mode must be one of {', '.join(GUIDANCE)}, got {self.guidance.mode!r}"),
            (self.image.repetition_penalty == 1.0, "image.repetition_penalty is not supported (pictures repeat codes by nature)"),
            # NaN/inf scales turn every guided logit into NaN: the picture would be drawn from argmax(NaN) = code 0
            (math.isfinite(self.guidance.scale) and math.isfinite(self.guidance.image_scale),
             f"guidance.scale and guidance.image_scale must be finite numbers, got {self.guidance.scale}, "
             f"{self.guidance.image_scale}"),
        ]
        for name in ("text", "image"):
            settings: ModalitySampling = getattr(self, name)
            checks += [
                (settings.temperature >= 0 and math.isfinite(settings.temperature), f"{name}.temperature must be >= 0"),
                (settings.top_k >= 0, f"{name}.top_k must be >= 0 (0 = off)"),
                (0.0 < settings.top_p <= 1.0, f"{name}.top_p must be in (0, 1]"),
                (0 < settings.repetition_penalty < math.inf, f"{name}.repetition_penalty must be positive and finite"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid sampling config: {message}")
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool; penalty (B,). CTRL (Keskar et al. 2019): a seen token's logit is divided
    by the penalty when positive and multiplied by it when negative, so penalty > 1 always makes it less likely."""
    penalty = penalty[:, None].to(logits.dtype)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), each per row; removed tokens get -inf.

    logits (B, V) fp32 with -inf at forbidden tokens; temperature (B,) (0 rows are left unscaled: they are drawn
    greedily); top_k (B,) long, 0 = off; top_p (B,), 1 = off. At least one token always survives.
    """
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = logits / scale[:, None]
    if bool(((top_k > 0) | (top_p < 1)).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop = drop | ((before >= top_p[:, None]) & (rank > 0))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def draw(logits: torch.Tensor, noise: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """Sample one token per row: argmax(logits - log(noise)) with noise ~ Exp(1) (exact sampling of
    softmax(logits)), or argmax(logits) where `greedy`. logits, noise (B, V); greedy (B,) bool -> (B,) long."""
    sampled = (logits - noise.log()).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def guided_logits(logits: torch.Tensor, guidance: Guidance) -> torch.Tensor:
    """Mix the guidance rows into the full-context rows.

    logits: (G * B, V), blocks of B rows: [full, uncond] for 2way, [full, image_only, uncond] for 3way.
    Returns (B, V) guided logits (the formulas in `Guidance`).
    """
    if guidance.mode == "none":
        return logits
    blocks = logits.chunk(guidance.contexts)
    if guidance.mode == "2way":
        full, uncond = blocks
        return uncond + guidance.scale * (full - uncond)
    full, image_only, uncond = blocks
    return uncond + guidance.image_scale * (image_only - uncond) + guidance.scale * (full - image_only)


class RowGenerators:
    """One torch.Generator per row, so a row's draws do not depend on which other rows share its batch."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = []
        for seed in seeds:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
            self.generators.append(generator)
        self.device = device

    def exponential(self, vocab_size: int) -> torch.Tensor:
        """(B, V) Exp(1) noise, one vector from each row's generator (drawn every step, used or not)."""
        return torch.stack([torch.empty(vocab_size, device=self.device).exponential_(generator=g)
                            for g in self.generators])
