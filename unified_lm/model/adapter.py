"""The continuous encoder-adapter path's module inside the unified model (LLaVA / Janus understanding).

pixels (M, 3, S, S) -> image encoder (ViT, unified_lm/vision/encoder.py) patch features (M, P, width)
       -> average-pooled over the patch grid by `pool` (M, P / pool^2, width)
       -> 2-layer MLP with GELU (M, P / pool^2, dim): one embedding per `<image>` placeholder.

Discrete image tokens keep what a VQ codebook can spell; continuous features keep fine detail (small text,
exact counts) for understanding. The number of placeholders a picture takes is fixed by the encoder's patch grid
at the picture size and the pooling; a dataset prepared for another count is refused by the trainer.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from runkit.typed_config import build_dataclass
from unified_lm.model.config import PictureConfig
from unified_lm.vision.encoder import VisionConfig, VisionEncoder


class PictureAdapter(nn.Module):
    def __init__(self, config: PictureConfig, dim: int):
        super().__init__()
        self.vision_config = build_dataclass(VisionConfig, config.encoder, "model.picture.encoder")
        self.encoder = VisionEncoder(self.vision_config)
        self.pool = config.pool
        hidden = config.adapter_hidden or dim
        self.adapter = nn.Sequential(nn.Linear(self.encoder.width, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def placeholders(self, image_size: int | None = None) -> int:
        """`<image>` placeholders per picture of `image_size` px (default: the encoder's training size)."""
        grid = math.isqrt(self.encoder.num_patches(image_size))
        if grid % self.pool:
            raise ValueError(f"model.picture.pool {self.pool} does not divide the encoder's {grid}x{grid} patch grid")
        return (grid // self.pool) ** 2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (M, 3, S, S) in [-1, 1] -> (M, placeholders, dim) embeddings, in raster order of the grid.
        The pixels take the encoder's dtype: a bf16 engine casts the model, not the batch."""
        pixels = pixels.to(self.encoder.patchify.weight.dtype)
        patches = self.encoder(pixels).patches  # (M, P, width)
        if self.pool > 1:
            count, number, width = patches.shape
            grid = math.isqrt(number)
            patches = patches.transpose(1, 2).reshape(count, width, grid, grid)
            patches = F.avg_pool2d(patches, self.pool).flatten(2).transpose(1, 2)
        return self.adapter(patches)
