"""What goes into the sampler and what comes out: prompts, segments and sampled documents.

Plain records, so that prompt files, rendering and evaluation read and write them without importing the
generation engine."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Segment:
    kind: str  # "text" | "image"
    tokens: list[int] = field(default_factory=list)  # model ids; a picture's codes only (no <boi>/<eoi>)
    text: str = ""  # decoded text ("text" segments)
    codes: np.ndarray | None = None  # (grid_h, grid_w) codes ("image" segments); None for a continuous picture
    pixels: np.ndarray | None = None  # (H, W, 3) uint8: a continuous prompt picture as the encoder saw it

    def to_json(self) -> dict:
        if self.kind == "text":
            return {"type": "text", "text": self.text}
        if self.codes is None:
            return {"type": "image", "continuous": True}
        return {"type": "image", "grid": list(self.codes.shape), "codes": self.codes.tolist()}


@dataclass
class ContinuousPicture:
    """A prompt picture for the continuous encoder-adapter path: (3, S, S) pixels in [-1, 1]. It enters the
    prompt as <boi>, one <image> placeholder per adapter feature, <eoi>; the model's picture adapter encodes it."""

    pixels: torch.Tensor


@dataclass
class Prompt:
    """Prompt segments: text (str), a picture as (h, w) image codes (from vqtok), or a `ContinuousPicture`.
    `seed` overrides the default per-prompt seed (SamplingConfig.seed + prompt index)."""

    segments: list = field(default_factory=list)
    seed: int | None = None


@dataclass
class SampledDocument:
    index: int  # position in the batch of prompts
    seed: int
    prompt: list[Segment]
    segments: list[Segment]  # what the model generated
    tokens: list[int]  # generated ids in order (<boi>, <eoi>, <eos> included)
    finish_reason: str  # "eos" | "length" (token budget spent) | "image" (image mode: the picture is complete)
    prompt_tokens: int = 0

    @property
    def images(self) -> list[np.ndarray]:
        return [s.codes for s in self.segments if s.kind == "image"]
