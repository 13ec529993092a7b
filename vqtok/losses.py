"""Tokenizer losses: pixel, LPIPS perceptual, PatchGAN hinge adversarial with adaptive weight.

Generator and discriminator losses are separate functions (LlamaGen's single `optimizer_idx` switch hid a
swapped-argument bug). The adaptive weight is taming-transformers' eq. 7: ||grad_L(rec)|| / ||grad_L(gan)||
w.r.t. the decoder's last layer, clamped to [0, max].
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .compat import import_lpips

log = logging.getLogger(__name__)

# torchvision's ImageNet trunks, by LPIPS net name, as they are named in the torch hub cache.
LPIPS_TRUNK_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def reconstruction_loss(images: torch.Tensor, reconstruction: torch.Tensor, l1_weight: float, l2_weight: float) -> torch.Tensor:
    loss = images.new_zeros(())
    if l1_weight:
        loss = loss + l1_weight * (images - reconstruction).abs().mean()
    if l2_weight:
        loss = loss + l2_weight * (images - reconstruction).pow(2).mean()
    return loss


def find_lpips_trunk(net: str, weights_path: str | None = None) -> Path | None:
    """The trunk's state-dict file: the given path, else the torch hub cache; None when neither exists."""
    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(LPIPS_TRUNK_FILES)}")
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS trunk weights not found: {path}")
        return path
    hub_dir = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    candidate = hub_dir / LPIPS_TRUNK_FILES[net]
    return candidate if candidate.is_file() else None


def build_lpips(net: str = "vgg", weights_path: str | None = None, allow_random_trunk: bool = False) -> nn.Module | None:
    """LPIPS with real trunk weights (never downloaded), frozen and in eval mode.

    Returns None, after one warning, when no trunk weights are found, unless `allow_random_trunk` (tests):
    then the trunk stays random, which exercises the code but measures nothing perceptual.
    """
    trunk = find_lpips_trunk(net, weights_path)
    if trunk is None and not allow_random_trunk:
        warnings.warn(
            f"LPIPS disabled: no {net} trunk weights at {LPIPS_TRUNK_FILES[net]} in the torch hub cache and none "
            "given (--lpips-weights PATH); training without the perceptual term.", stacklevel=2)
        return None
    lpips = import_lpips()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation chatter
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if trunk is not None:
        _load_trunk(model.net, torch.load(trunk, map_location="cpu", weights_only=True), trunk)
    model.eval().requires_grad_(False)
    return model


def _load_trunk(trunk: nn.Module, state: dict, source: Path) -> None:
    """Copy torchvision `features.{i}.*` tensors into lpips' `slice{k}.{i}.*` modules."""
    loaded = 0
    for name, param in trunk.named_parameters():
        _, index, kind = name.split(".")  # e.g. slice2.5.weight
        key = f"features.{index}.{kind}"
        if key not in state:
            raise ValueError(f"LPIPS trunk weights {source}: missing tensor {key!r}")
        if state[key].shape != param.shape:
            raise ValueError(f"LPIPS trunk weights {source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
        param.data.copy_(state[key])
        loaded += 1
    log.info("LPIPS trunk: %d tensors from %s", loaded, source)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): (B, 3, H, W) -> (B, 1, h, w) real/fake logits per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = channels
        for index in range(1, num_layers + 1):
            out_width = channels * min(2 ** index, 8)
            stride = 2 if index < num_layers else 1
            layers += [nn.Conv2d(width, out_width, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(out_width), nn.LeakyReLU(0.2, True)]
            width = out_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge generator loss: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W_last|| / (||d gan / d W_last|| + 1e-4), clamped to [0, max_weight], detached."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
