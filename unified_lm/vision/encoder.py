"""The ViT picture tower: what the continuous path's adapter reads and what the contrastive model trains.

`VisionEncoder(pixels).patches` (B, P, width) is what an adapter projects into the language model; the contrastive
model (contrastive.py) trains it beside a text tower.

- ViT (Dosovitskiy et al. 2021): a Conv2d with stride = patch size cuts the picture into patches, learned position
  embeddings for the config's grid are added, then pre-norm transformer blocks with bidirectional attention and a
  final LayerNorm. At another resolution the position table is resized by bicubic interpolation (ViT section 3.2,
  "fine-tuning at higher resolution"), so a 48 px-trained encoder reads 64 px pictures (a 8x8 grid instead of
  6x6); at the native size the table is used as is.
- Pooling: the mean of the patch outputs (`pool="mean"`; ViT appendix D.3 found global average pooling as good as
  a class token), or a learned class token (`pool="cls"`, CLIP's ViT).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runkit.typed_config import out_of_bounds

POOLS = ("mean", "cls")


@dataclass
class VisionConfig:
    image_size: int = 48  # native input size; other sizes work through position-embedding interpolation
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = "mean"  # "mean" over patch outputs | "cls" (a learned class token)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size



def check_vision(vision: VisionConfig, where: str) -> None:
    """The image encoder's sizes and shape rules (`where`: the config position, for the message)."""
    problems = [f"{where}.{p}" for p in out_of_bounds(vision, {"image_size": (1, 4096), "patch_size": (1, 1024),
                                                                "width": (1, 1 << 14), "layers": (1, 256),
                                                                "heads": (1, 256)})]
    if not problems:
        checks = [(vision.image_size % vision.patch_size == 0,
                   f"image_size {vision.image_size} must be a multiple of patch_size {vision.patch_size}"),
                  (vision.width % vision.heads == 0, f"width {vision.width} must be divisible by heads {vision.heads}"),
                  (0 < vision.mlp_ratio <= 64, "mlp_ratio must be in (0, 64]"),
                  (vision.pool in POOLS, f"pool must be one of {POOLS}, got {vision.pool!r}")]
        problems = [f"{where}.{message}" for ok, message in checks if not ok]
    if problems:
        raise ValueError("invalid encoder config: " + "; ".join(problems))


# -----------------------------------------------------------------------------
# Towers

class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # bidirectional; mask: (B, 1, 1, T) keys
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm, attention, LayerNorm, GELU MLP), as in ViT and CLIP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


@dataclass
class VisionOutput:
    patches: torch.Tensor  # (B, P, width): final-norm outputs of the patch positions (what an adapter reads)
    pooled: torch.Tensor  # (B, width): their mean, or the class token's output with pool="cls"


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.width = config.width
        self.patchify = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        self.position = nn.Parameter(torch.randn(1, config.grid * config.grid, config.width) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width)) if config.pool == "cls" else None
        self.blocks = nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.apply(init_weights)

    def num_patches(self, image_size: int | None = None) -> int:
        """Patch tokens for a square picture of `image_size` pixels (default: the native size)."""
        return ((image_size or self.config.image_size) // self.config.patch_size) ** 2

    def position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """(1, height * width, W): the learned table, bicubically resized when the grid is not the native one."""
        grid = self.config.grid
        if (height, width) == (grid, grid):
            return self.position
        table = self.position.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, W, grid, grid)
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, height * width, -1)

    def forward(self, pixels: torch.Tensor) -> VisionOutput:
        patch = self.config.patch_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or min(pixels.shape[-2:]) < patch:
            raise ValueError(f"VisionEncoder expects (B, 3, H, W) pictures with H, W >= {patch}, "
                             f"got {tuple(pixels.shape)}")
        x = self.patchify(pixels)  # (B, W, h, w); a remainder of H or W below one patch is dropped, as in ViT
        x = x.flatten(2).transpose(1, 2) + self.position_embeddings(*x.shape[-2:])  # (B, P, W)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + P, W)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.cls_token is not None:
            return VisionOutput(patches=x[:, 1:], pooled=x[:, 0])
        return VisionOutput(patches=x, pooled=x.mean(dim=1))
