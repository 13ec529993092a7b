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


# -----------------------------------------------------------------------------
# Codes a language model can learn: stability and meaning
#
# Usage and perplexity can be high while codes are useless to a model that must predict them: if the same
# content gets one of many codes depending on noise or on the rest of the picture, the model pays for guessing
# which. Two measures say whether codes are a function of what the picture shows.

def agreement(codes: torch.Tensor, other: torch.Tensor) -> float:
    """Share of positions where two code tensors of the same shape hold the same code (1.0 = all)."""
    if codes.shape != other.shape:
        raise ValueError(f"code tensors differ in shape: {tuple(codes.shape)} vs {tuple(other.shape)}")
    return float((codes == other).double().mean()) if codes.numel() else math.nan


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of a (R, K) count matrix (rows of zeros give 0)."""
    totals = counts.sum(-1, keepdim=True).clamp_min(1)
    probs = counts / totals
    return -(probs * probs.clamp_min(1e-300).log()).sum(-1)


def conditional_entropy(codes, labels) -> dict:
    """How far codes are a function of content, from parallel sequences of codes and content labels (one per
    token; a label names what the token's patch shows, e.g. `token_labels`).

    code_given_label: H(code | label) in nats: 0 when equal content always gets the same code; ln(n) when it
        spreads evenly over n codes. This is what a model predicting codes from content pays beyond the content.
    label_given_code: H(label | code) in nats: 0 when a code always means one content; high when a code is
        shared by different contents (which a decoder cannot then draw apart).
    majority_share: share of tokens whose code is their label's most frequent code.
    codes_per_label: mean number of distinct codes per label (over labels, unweighted)."""
    codes = torch.as_tensor(codes).reshape(-1).long()
    names = sorted(set(labels))
    if len(names) == 0 or len(labels) != codes.numel():
        raise ValueError(f"need one label per code: {codes.numel()} codes, {len(labels)} labels")
    number = {name: i for i, name in enumerate(names)}
    label_ids = torch.tensor([number[x] for x in labels])
    _, code_ids = codes.unique(return_inverse=True)
    joint = torch.zeros(len(names), int(code_ids.max()) + 1, dtype=torch.float64)
    joint.index_put_((label_ids, code_ids), torch.ones(len(codes), dtype=torch.float64), accumulate=True)
    total = joint.sum()
    by_label, by_code = joint.sum(1), joint.sum(0)
    return {
        "code_given_label": float((by_label / total * _entropy(joint)).sum()),
        "label_given_code": float((by_code / total * _entropy(joint.T)).sum()),
        "majority_share": float(joint.max(1).values.sum() / total),
        "codes_per_label": float((joint > 0).sum(1).double().mean()),
        "labels": len(names), "tokens": int(total),
    }


def token_labels(cells: list[list[str]], grid: tuple[int, int]) -> list[str]:
    """Content label of every token of an (h, w) code grid over a picture whose regions are labelled by an
    (R, C) grid of strings `cells` (e.g. the world's 3x3 cells: "empty", "large red circle", "word GO").

    A token's label names every labelled cell its patch overlaps, with the overlap's place inside that cell, so
    two tokens get the same label exactly when their patches show the same content at the same offsets: for a
    6x6 code grid over 3x3 cells, "small red circle@(1/2,0)-(1,1/2)" is the bottom-left quarter of a small red
    circle's cell. Returned in raster order (h * w strings)."""
    from fractions import Fraction

    rows, columns = len(cells), len(cells[0]) if cells else 0
    if rows == 0 or columns == 0 or any(len(row) != columns for row in cells):
        raise ValueError(f"cell labels must be a non-empty rectangular grid, got {[len(row) for row in cells]}")
    height, width = grid

    def spans(index: int, tokens: int, regions: int) -> list[tuple[int, Fraction, Fraction]]:
        """(region, start, end) of a token's extent [index, index + 1) in region units, start/end in [0, 1]."""
        low, high = Fraction(index * regions, tokens), Fraction((index + 1) * regions, tokens)
        found = []
        for region in range(int(low), min(regions, -(-high.numerator // high.denominator))):
            start, end = max(low, Fraction(region)) - region, min(high, Fraction(region + 1)) - region
            if end > start:
                found.append((region, start, end))
        return found

    labels = []
    for i in range(height):
        for j in range(width):
            parts = [f"{cells[r][c]}@({y0},{x0})-({y1},{x1})"
                     for r, y0, y1 in spans(i, height, rows) for c, x0, x1 in spans(j, width, columns)]
            labels.append(" | ".join(parts))
    return labels
