"""VQGAN-style image tokenizer: conv encoder -> quantizer -> conv decoder.

Layout follows taming-transformers' VQGAN (Esser et al. 2021), which Chameleon's tokenizer (Gafni et al. 2022,
Make-A-Scene) also uses: residual blocks with GroupNorm + swish, strided-conv downsampling, nearest-neighbour
upsampling, one self-attention block at the lowest resolution (in the middle of encoder and decoder), and 1x1
convs into/out of the quantizer space. Fully convolutional, so any multiple of the downsample factor works.

Non-standard: `model.encoder_context="patch"` encodes every f x f patch on its own (the same layers, run on the
patches as a batch, with a per-position channel norm instead of GroupNorm and no attention), so a code is a
function of its own patch's pixels and nothing else. The default "image" encoder mixes the whole picture
(GroupNorm statistics, attention, receptive fields across patches): the same patch content can then get
different codes in different pictures, which a language model over the codes has to guess (docs/benchmarks.md).

    image (B, 3, H, W) in [-1, 1]
      -> Encoder -> (B, z_channels, H/f, W/f) -> quant_conv -> (B, embed_dim, h, w)
      -> VectorQuantizer -> indices (B, h, w) and quantized latents
      -> post_quant_conv -> Decoder -> reconstruction (B, 3, H, W)
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, QuantizerConfig, VQConfig
from .quantizer import VectorQuantizer


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    groups = min(num_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position, (B, C, H, W) -> same: no statistics across positions, so a
    position's output never depends on the rest of the picture (and a flat patch keeps its colour, which a
    GroupNorm over the patch would normalise away)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


Norm = Callable[[int], nn.Module]  # channels -> normalisation layer


def norm_for(config: ModelConfig, local: bool = False) -> Norm:
    """GroupNorm with the config's groups, or (local) the per-position ChannelNorm."""
    return ChannelNorm if local else partial(group_norm, num_groups=config.num_groups)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: Norm, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions (only used at the lowest resolution)."""

    def __init__(self, channels: int, norm: Norm):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, hw, C)
        return x + self.proj(out.transpose(-1, -2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric pad keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(channels: int, config: ModelConfig, norm: Norm, attention: bool = True) -> nn.Sequential:
    attention = [AttnBlock(channels, norm)] if attention and config.attention_at_lowest else []
    return nn.Sequential(ResBlock(channels, channels, norm, config.dropout), *attention,
                         ResBlock(channels, channels, norm, config.dropout))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/f, W/f). With encoder_context="patch" every f x f patch goes through the
    layers alone (as one batch of patches), so each output position sees its own patch only."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.patch = config.downsample_factor if config.encoder_context == "patch" else None
        norm = norm_for(config, local=self.patch is not None)
        widths = [config.base_channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        layers, in_width = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResBlock(in_width, width, norm, config.dropout))
                in_width = width
            if level != len(widths) - 1:
                layers.append(Downsample(width))
        self.down = nn.Sequential(*layers)
        # attention over one position would be a linear map: the patch encoder has none
        self.mid = middle(in_width, config, norm, attention=self.patch is None)
        self.norm_out = norm(in_width)
        self.conv_out = nn.Conv2d(in_width, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            return self._layers(x)
        batch, channels, height, width = x.shape
        f, h, w = self.patch, height // self.patch, width // self.patch
        patches = x.reshape(batch, channels, h, f, w, f).permute(0, 2, 4, 1, 3, 5).reshape(batch * h * w, channels, f, f)
        z = self._layers(patches)  # (B*h*w, z_channels, 1, 1)
        return z.reshape(batch, h, w, -1).permute(0, 3, 1, 2)

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        norm = norm_for(config)
        widths = [config.base_channels * m for m in config.channel_multipliers]
        in_width = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, in_width, 3, padding=1)
        self.mid = middle(in_width, config, norm)
        layers = []
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResBlock(in_width, widths[level], norm, config.dropout))
                in_width = widths[level]
            if level != 0:
                layers.append(Upsample(in_width))
        self.up = nn.Sequential(*layers)
        self.norm_out = norm(in_width)
        self.conv_out = nn.Conv2d(in_width, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 3, H, W)
    indices: torch.Tensor | None  # (B, h, w) int64; None when the quantizer was bypassed
    commitment_loss: torch.Tensor  # scalar


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        model: ModelConfig = config.model
        quant: QuantizerConfig = config.quantizer
        self.encoder = Encoder(model)
        self.quant_conv = nn.Conv2d(model.z_channels, quant.embed_dim, 1)
        self.quantizer = VectorQuantizer(quant)
        self.post_quant_conv = nn.Conv2d(quant.embed_dim, model.z_channels, 1)
        self.decoder = Decoder(model) if model.has_decoder else None

    @property
    def downsample_factor(self) -> int:
        return self.config.model.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    def forward(self, images: torch.Tensor, quantize: bool = True) -> VQOutput:
        """Training path: images (B, 3, H, W) in [-1, 1]. quantize=False bypasses the quantizer (the decoder gets
        the continuous latents): the autoencoder warm-up of `train.quantizer_warmup_steps`."""
        self._check_images(images)
        latents = self.quant_conv(self.encoder(images))
        if not quantize:
            return VQOutput(self.decode_latents(latents), None, latents.new_zeros(()))
        quantized = self.quantizer(latents)
        return VQOutput(self.decode_latents(quantized.quantized), quantized.indices, quantized.commitment_loss)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError(f"tokenizer {self.config.name!r} has no decoder (converted from an encoder-only "
                             "checkpoint such as transformers' ChameleonVQVAE): it encodes pictures but cannot draw "
                             "them; convert Meta's VQGAN checkpoint (with its decoder) to decode")
        return self.decoder(self.post_quant_conv(quantized))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Inference: images (B, 3, H, W) in [-1, 1] -> code indices (B, H/f, W/f) int64."""
        self._check_images(images)
        return self.quantizer.indices(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1]."""
        return self.decode_latents(self.quantizer.embed(indices))

    def _check_images(self, images: torch.Tensor) -> None:
        factor = self.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.config.model.in_channels:
            raise ValueError(f"expected images of shape (B, {self.config.model.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not a multiple of the downsample factor {factor}")

    @property
    def last_decoder_layer(self) -> torch.Tensor:
        """Weight the adaptive GAN weight differentiates through (taming: decoder.conv_out.weight)."""
        return self.decoder.conv_out.weight
