"""Reconstruction and codebook metrics: PSNR, SSIM, codebook usage and code perplexity.

Images are compared in [0, 1] (inputs given in [-1, 1]). SSIM is Wang et al. 2004 with an 11x11 Gaussian window
(sigma 1.5), computed per channel and averaged, as skimage/torchmetrics do for RGB.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(-1, 1).add(1).div(2)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,), for (B, 3, H, W) inputs in [-1, 1]."""
    mse = (_unit(images) - _unit(reconstructions)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-coords.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return (kernel[:, None] * kernel[None, :]).float()


def ssim(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, (B,), for (B, C, H, W) inputs in [-1, 1] (valid-window, data range 1)."""
    x, y = _unit(images), _unit(reconstructions)
    channels = x.shape[1]
    window = _gaussian_window().to(x.device)[None, None].expand(channels, 1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def code_statistics(indices: torch.Tensor, codebook_size: int) -> dict:
    """Usage (fraction of the codebook seen) and perplexity (exp of the code entropy, in codes) of a set of indices."""
    flat = indices.reshape(-1).long()
    counts = torch.bincount(flat, minlength=codebook_size).double()
    total = counts.sum().item()
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0, "used_codes": 0, "tokens": 0}
    probs = counts[counts > 0] / total
    entropy = -(probs * probs.log()).sum().item()
    return {"usage": int((counts > 0).sum()) / codebook_size, "perplexity": math.exp(entropy),
            "used_codes": int((counts > 0).sum()), "tokens": int(total)}


class RollingCodeUsage:
    """The last `window` code indices seen in training (a ring buffer), for usage/perplexity over a fixed count."""

    def __init__(self, codebook_size: int, window: int = 65_536):
        self.codebook_size = codebook_size
        self.buffer = torch.zeros(window, dtype=torch.long)
        self.filled = 0
        self.position = 0

    def update(self, indices: torch.Tensor) -> None:
        flat = indices.detach().reshape(-1).long().cpu()[-len(self.buffer) :]
        end = self.position + len(flat)
        if end <= len(self.buffer):
            self.buffer[self.position : end] = flat
        else:
            split = len(self.buffer) - self.position
            self.buffer[self.position :] = flat[:split]
            self.buffer[: end - len(self.buffer)] = flat[split:]
        self.position = end % len(self.buffer)
        self.filled = min(len(self.buffer), self.filled + len(flat))

    def statistics(self) -> dict:
        return code_statistics(self.buffer[: self.filled], self.codebook_size)

    def state(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.clone(), "filled_position": torch.tensor([self.filled, self.position])}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state["buffer"].shape != self.buffer.shape:
            raise ValueError(f"usage window size changed: checkpoint {tuple(state['buffer'].shape)}, config {tuple(self.buffer.shape)}")
        self.buffer.copy_(state["buffer"])
        self.filled, self.position = (int(v) for v in state["filled_position"])
