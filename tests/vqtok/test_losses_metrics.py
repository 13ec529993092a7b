"""GAN losses, adaptive weight, LPIPS loading, PSNR/SSIM and codebook statistics against hand computations."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vqtok import losses
from vqtok.metrics import RollingCodeUsage, code_statistics, psnr, ssim


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6
    assert losses.discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    assert losses.generator_adversarial_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_adaptive_weight_is_gradient_norm_ratio():
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    rec = (weight * 3).sum()  # grad = 3 everywhere -> norm 6
    gan = (weight**2).sum()  # grad = 2w -> norm 2*||w||
    expected = 6.0 / (2 * weight.detach().norm().item() + 1e-4)
    assert losses.adaptive_weight(rec, gan, weight).item() == pytest.approx(expected, rel=1e-6)
    assert losses.adaptive_weight(rec * 1e9, gan, weight, max_weight=10.0).item() == 10.0


def test_reconstruction_loss_terms():
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert losses.reconstruction_loss(a, b, 1.0, 0.0).item() == pytest.approx(0.5)
    assert losses.reconstruction_loss(a, b, 0.0, 2.0).item() == pytest.approx(0.5)


def test_lpips_without_weights_warns_once_and_returns_none():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert losses.build_lpips("alex") is None
    assert any("LPIPS disabled" in str(w.message) for w in caught)


def test_lpips_random_trunk_and_weights_from_path(tmp_path):
    from vqtok.compat import import_torchvision

    model = losses.build_lpips("alex", allow_random_trunk=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max().item() < 1e-6
    assert model(x, x.flip(0)).mean().item() > 0
    # A torchvision-format trunk file given by path is loaded into lpips' slices.
    trunk = import_torchvision().models.alexnet().state_dict()
    torch.save(trunk, tmp_path / "alex.pth")
    loaded = losses.build_lpips("alex", weights_path=str(tmp_path / "alex.pth"))
    assert torch.equal(getattr(loaded.net.slice1, "0").weight, trunk["features.0.weight"])
    assert torch.equal(getattr(loaded.net.slice5, "10").weight, trunk["features.10.weight"])
    with pytest.raises(FileNotFoundError, match="LPIPS trunk weights not found"):
        losses.build_lpips("alex", weights_path=str(tmp_path / "missing.pth"))


def test_patch_discriminator_shape():
    disc = losses.PatchDiscriminator(channels=8, num_layers=2)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_psnr_known_value():
    a = torch.zeros(1, 3, 4, 4) - 1  # 0 in [0, 1]
    b = a + 0.2  # 0.1 in [0, 1] -> mse 0.01 -> 20 dB
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-4)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (3, 40, 48))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ours = ssim(torch.tensor(a[None] * 2 - 1), torch.tensor(b[None] * 2 - 1)).item()
    # skimage with a Gaussian window, sigma 1.5, no covariance correction, per channel then mean.
    reference = np.mean([structural_similarity(a[c], b[c], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                               use_sample_covariance=False) for c in range(3)])
    assert ours == pytest.approx(reference, abs=2e-3)
    assert ssim(torch.tensor(a[None]), torch.tensor(a[None])).item() == pytest.approx(1.0, abs=1e-6)


def test_code_statistics_by_hand():
    stats = code_statistics(torch.tensor([0, 0, 1, 3]), codebook_size=8)
    assert stats["usage"] == 3 / 8 and stats["used_codes"] == 3 and stats["tokens"] == 4
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert stats["perplexity"] == pytest.approx(math.exp(entropy))


def test_rolling_usage_keeps_only_the_window():
    usage = RollingCodeUsage(codebook_size=16, window=4)
    usage.update(torch.tensor([1, 2, 3]))
    usage.update(torch.tensor([4, 5]))  # wraps: window now holds 2, 3, 4, 5
    assert usage.statistics()["used_codes"] == 4
    usage.update(torch.arange(10))  # longer than the window: last 4 only
    assert sorted(usage.buffer.tolist()) == [6, 7, 8, 9]
    clone = RollingCodeUsage(16, 4)
    clone.load_state(usage.state())
    assert clone.statistics() == usage.statistics()
