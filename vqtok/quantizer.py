"""The vector quantizer: vector-quantize-pytorch's VectorQuantize for training, `nearest_code` for inference.

Training goes through VectorQuantize (EMA, k-means init, dead-code revival, rotation-trick gradients, codebook
sync across processes). Inference (`indices`, `embed`) reads the same codebook but finds codes through
vqtok.lookup.nearest_code, the single swap point for a fused kernel.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from .config import QuantizerConfig
from .lookup import nearest_code


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, embed_dim, h, w), straight-through / rotation-trick gradients to the encoder
    indices: torch.Tensor  # (B, h, w) int64
    commitment_loss: torch.Tensor  # scalar, already weighted


class VectorQuantizer(nn.Module):
    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        self.vq = VectorQuantize(
            dim=config.embed_dim,
            codebook_size=config.codebook_size,
            codebook_dim=config.codebook_dim,
            use_cosine_sim=config.l2_normalized,
            decay=config.ema_decay,
            kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters,
            threshold_ema_dead_code=config.dead_code_threshold,
            commitment_weight=config.commitment_weight,
            ema_update=config.ema,
            learnable_codebook=not config.ema,
            # Averages EMA statistics, k-means init and revived codes over processes; without it the ranks'
            # codebooks drift apart under data parallelism.
            sync_codebook=dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1,
            accept_image_fmap=True,
        )

    @property
    def metric(self) -> str:
        return "cosine" if self.config.l2_normalized else "l2"

    @property
    def codebook(self) -> torch.Tensor:
        """(codebook_size, lookup_dim) codes in the lookup space (l2-normalised when cosine)."""
        codes = self.vq.codebook
        return nn.functional.normalize(codes, dim=-1) if self.config.l2_normalized else codes

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, embed_dim, h, w) float -> quantized latents, indices, weighted commitment loss."""
        quantized, indices, loss = self.vq(z.float())
        return QuantizerOutput(quantized.to(z.dtype), indices, loss)

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Inference: (B, embed_dim, h, w) -> (B, h, w) int64 nearest-code indices."""
        batch, _, height, width = z.shape
        vectors = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        vectors = self.vq.project_in(vectors)
        if self.config.l2_normalized:
            vectors = nn.functional.normalize(vectors, dim=-1)
        flat = nearest_code(vectors, self.codebook.float(), metric=self.metric)
        return flat.view(batch, height, width)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) integer indices -> (B, embed_dim, h, w) quantized latents for the decoder."""
        if indices.min() < 0 or indices.max() >= self.config.codebook_size:
            raise ValueError(f"code indices must be in [0, {self.config.codebook_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        codes = self.codebook[indices.long()]  # (B, h, w, lookup_dim)
        return self.vq.project_out(codes).permute(0, 3, 1, 2).contiguous()
