"""The quantizer, from vector-quantize-pytorch: VectorQuantize (kind "vq") or FSQ (kind "fsq").

kind "vq": training goes through VectorQuantize (EMA, k-means init, dead-code revival, rotation-trick gradients,
codebook sync across processes). Inference (`indices`, `embed`) reads the same codebook but finds codes through
vqtok.lookup.nearest_code, the single swap point for a fused kernel.
kind "fsq": finite scalar quantization; a code is the per-dimension rounding of the bounded latent, so there is
no codebook to learn, search or sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from .config import QuantizerConfig
from .lookup import nearest_code


def kmeans_plus_plus(vectors: torch.Tensor, codes: int, iterations: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with k-means++ seeding (Arthur & Vassilvitskii 2007) over the distinct vectors, each weighted by
    how often it occurs. vectors (N, D) float -> centres (codes, D) and cluster sizes (codes,) in vectors.

    Why not random seeding (what vector-quantize-pytorch does): in pictures where one content dominates (a plain
    background), random draws start many identical centres on it; one wins and the rest sit beside it, so the
    least noise moves that content between codes, while rarer contents find no centre and share one. k-means++
    never picks a point twice (its distance to a chosen centre is 0) and favours points far from every centre.
    With fewer distinct vectors than codes, the spare centres go far outside the data, where nothing reaches them."""
    generator = torch.Generator(device=vectors.device).manual_seed(seed)
    points, counts = torch.unique(vectors.float(), dim=0, return_counts=True)
    weights = counts.float()
    chosen = [int(torch.multinomial(weights, 1, generator=generator))]
    nearest = (points - points[chosen[0]]).pow(2).sum(-1)
    for _ in range(min(codes, len(points)) - 1):
        odds = weights * nearest
        if float(odds.sum()) <= 0:
            break
        chosen.append(int(torch.multinomial(odds, 1, generator=generator)))
        nearest = torch.minimum(nearest, (points - points[chosen[-1]]).pow(2).sum(-1))
    centres = points[chosen].clone()
    for _ in range(iterations):  # Lloyd, weighted; an empty cluster keeps its centre
        assignment = torch.cdist(points, centres).argmin(-1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points * weights[:, None])
        sizes = torch.zeros(len(centres), device=points.device).index_add_(0, assignment, weights)
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1e-12)[:, None], centres)
    sizes = torch.zeros(len(centres), device=points.device).index_add_(0, torch.cdist(points, centres).argmin(-1), weights)
    if len(centres) < codes:  # spare codes: random directions 10 data radii out
        spare = torch.randn(codes - len(centres), points.shape[1], generator=generator, device=points.device)
        radius = 10 * (points - points.mean(0)).norm(dim=-1).max().clamp_min(1.0)
        centres = torch.cat([centres, points.mean(0) + radius * nn.functional.normalize(spare, dim=-1)])
        sizes = torch.cat([sizes, sizes.new_zeros(codes - len(sizes))])
    return centres, sizes


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, embed_dim, h, w), straight-through / rotation-trick gradients to the encoder
    indices: torch.Tensor  # (B, h, w) int64
    commitment_loss: torch.Tensor  # scalar, already weighted


class VectorQuantizer(nn.Module):
    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        if config.kind == "fsq":
            self.fsq = FSQ(levels=list(config.fsq_levels), dim=config.embed_dim, channel_first=True)
            return
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
        # several processes keep the library's distributed sampler (it draws across ranks; worst-fit would need a
        # gather first): documented beside QuantizerConfig.revive_from. Not an error: encoding under torchrun
        # builds this module too, and never revives.
        if config.revive_from == "worst" and not self.vq._codebook.replace_sample_fn.__name__.endswith("distributed"):
            self.vq._codebook.replace_sample_fn = self._worst_fit

    def _worst_fit(self, samples: torch.Tensor, count: int) -> torch.Tensor:
        """Revival seeds (vector-quantize-pytorch's replace_sample_fn): samples (1, N, D) -> (1, count, D), the
        distinct samples farthest from their nearest live code, worst first (repeated when too few are distinct)."""
        codebook = self.vq._codebook
        live = codebook.embed[0][codebook.cluster_size[0] >= self.config.dead_code_threshold]
        vectors = torch.unique(samples[0], dim=0)
        if len(live):
            order = torch.cdist(vectors.float(), live.float()).min(-1).values.argsort(descending=True)
            vectors = vectors[order]
        return vectors[torch.arange(count, device=vectors.device) % len(vectors)][None]

    @property
    def metric(self) -> str:
        return "cosine" if self.config.l2_normalized else "l2"

    @property
    def codebook(self) -> torch.Tensor:
        """(codebook_size, lookup_dim) codes in the lookup space (l2-normalised when cosine; FSQ: the grid)."""
        if self.config.kind == "fsq":
            return self.fsq._indices_to_codes(torch.arange(self.config.codebook_size, device=self.fsq._levels.device))
        codes = self.vq.codebook
        return nn.functional.normalize(codes, dim=-1) if self.config.l2_normalized else codes

    @property
    def needs_initialisation(self) -> bool:
        """A k-means-initialised codebook that has not seen data yet."""
        return self.config.kind == "vq" and self.config.kmeans_init and not bool(self.vq._codebook.initted)

    @torch.no_grad()
    def initialise(self, latents: torch.Tensor, seed: int = 0) -> None:
        """k-means++ initialisation of a learned codebook from latents (N, embed_dim) (`kmeans_plus_plus`), in the
        lookup space (after the library's projection; l2-normalised for cosine codebooks)."""
        vectors = self.vq.project_in(latents.float())
        if self.config.l2_normalized:
            vectors = nn.functional.normalize(vectors, dim=-1)
        centres, sizes = kmeans_plus_plus(vectors, self.config.codebook_size, self.config.kmeans_iters, seed)
        if self.config.l2_normalized:
            centres = nn.functional.normalize(centres, dim=-1)
        codebook = self.vq._codebook
        if self.config.ema and hasattr(codebook, "embed_avg"):
            codebook.embed_avg.copy_((centres * sizes[:, None])[None])
            codebook.cluster_size.copy_(sizes[None])
        codebook.embed.data.copy_(centres[None])
        codebook.initted.fill_(True)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, embed_dim, h, w) float -> quantized latents, indices, weighted commitment loss."""
        if self.config.kind == "fsq":
            quantized, indices = self.fsq(z.float())
            return QuantizerOutput(quantized.to(z.dtype), indices.long(), z.new_zeros(()))
        quantized, indices, loss = self.vq(z.float())
        return QuantizerOutput(quantized.to(z.dtype), indices, loss)

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Inference: (B, embed_dim, h, w) -> (B, h, w) int64 nearest-code indices."""
        if self.config.kind == "fsq":
            return self.fsq(z.float())[1].long()
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
        if self.config.kind == "fsq":
            return self.fsq.indices_to_codes(indices.long()).contiguous()
        codes = self.codebook[indices.long()]  # (B, h, w, lookup_dim)
        return self.vq.project_out(codes).permute(0, 3, 1, 2).contiguous()
