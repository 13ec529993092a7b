"""What makes codes learnable: code stability, conditional entropy of codes and content, the patch-local encoder,
FSQ and the autoencoder warm-up, each against a hand computation or a constructed case."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vqtok.config import preset
from vqtok.evaluate import as_8bit, perturb, read_region_labels, reconstruction_metrics
from vqtok.metrics import agreement, conditional_entropy, token_labels
from vqtok.model import VQModel


def test_agreement_by_hand():
    a = torch.tensor([[1, 2], [3, 4]])
    assert agreement(a, a) == 1.0
    assert agreement(a, torch.tensor([[1, 0], [3, 0]])) == 0.5
    with pytest.raises(ValueError, match="shape"):
        agreement(a, a.reshape(-1))


def test_conditional_entropy_by_hand():
    # content x carries codes 1, 1, 2; content y carries code 3 (a code never shared): H(code|x) = H(2/3, 1/3)
    result = conditional_entropy([1, 1, 2, 3], ["x", "x", "x", "y"])
    h_x = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert result["code_given_label"] == pytest.approx(0.75 * h_x)
    assert result["label_given_code"] == pytest.approx(0.0)
    assert result["majority_share"] == pytest.approx(0.75)
    assert result["codes_per_label"] == pytest.approx(1.5)
    # one code for two contents, evenly: H(content | code) = ln 2, H(code | content) = 0
    merged = conditional_entropy([7, 7, 7, 7], ["x", "y", "x", "y"])
    assert merged["code_given_label"] == pytest.approx(0.0)
    assert merged["label_given_code"] == pytest.approx(math.log(2))
    # codes spread evenly over 4 per content: ln 4
    assert conditional_entropy([0, 1, 2, 3], ["x"] * 4)["code_given_label"] == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="one label per code"):
        conditional_entropy([1, 2], ["x"])


def test_token_labels_aligned_and_misaligned():
    cells = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    assert token_labels(cells, (3, 3)) == [f"{c}@(0,0)-(1,1)" for c in "abcdefghi"]
    six = token_labels(cells, (6, 6))
    # the four quarters of cell a, in raster order, and the same quarter of two cells differs only by content
    assert [six[0], six[1], six[6], six[7]] == ["a@(0,0)-(1/2,1/2)", "a@(0,1/2)-(1/2,1)", "a@(1/2,0)-(1,1/2)",
                                                "a@(1/2,1/2)-(1,1)"]
    assert six[2] == "b@(0,0)-(1/2,1/2)"
    four = token_labels(cells, (4, 4))  # a token straddling two cells names both, with their parts
    assert four[1] == "a@(0,3/4)-(3/4,1) | b@(0,0)-(3/4,1/2)"
    # equal content everywhere, but a 4x4 grid over 3x3 cells puts every token at its own offsets
    assert len(set(token_labels([["x"] * 3] * 3, (4, 4)))) == 16 and len(set(token_labels([["x"] * 3] * 3, (6, 6)))) == 4
    with pytest.raises(ValueError, match="rectangular"):
        token_labels([["a"], ["b", "c"]], (2, 2))


def _tiny(**overrides) -> VQModel:
    torch.manual_seed(0)
    config = preset("tiny").with_overrides({"quantizer.kmeans_init": False, **overrides}).validate()
    return VQModel(config).eval()


def test_patch_encoder_codes_are_a_function_of_their_patch():
    """Two pictures that share one 2x2 patch (tiny is f2) but nothing else: the patch encoder gives that patch
    the same latent; the picture-wide encoder (GroupNorm, attention) does not."""
    torch.manual_seed(1)
    a, b = torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(1, 3, 8, 8) * 2 - 1
    b[..., 2:4, 4:6] = a[..., 2:4, 4:6]  # patch (1, 2)
    for context, same in (("patch", True), ("image", False)):
        model = _tiny(**{"model.encoder_context": context})
        za, zb = model.encoder(a), model.encoder(b)
        assert torch.allclose(za[..., 1, 2], zb[..., 1, 2], atol=1e-6) == same, context
        assert not torch.allclose(za[..., 0, 0], zb[..., 0, 0])  # the other patches differ


def test_patch_encoder_keeps_a_flat_patch_colour():
    """A GroupNorm over a flat patch would normalise its colour away; the channel norm keeps it."""
    model = _tiny(**{"model.encoder_context": "patch"})
    dark, light = torch.full((1, 3, 2, 2), -0.8), torch.full((1, 3, 2, 2), 0.8)
    assert not torch.allclose(model.encoder(dark), model.encoder(light), atol=1e-3)


def test_fsq_codes_round_trip_and_equal_latents_get_equal_codes():
    model = _tiny(**{"quantizer.kind": "fsq", "quantizer.fsq_levels": [4, 4, 4], "quantizer.codebook_size": 64})
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    images[1] = images[0]
    codes = model.encode(images)
    assert codes.shape == (2, 4, 4) and codes.min() >= 0 and codes.max() < 64
    assert torch.equal(codes[0], codes[1])
    latents = model.quant_conv(model.encoder(images))
    quantized = model.quantizer(latents)  # training path: the grid point of each code, through project_out
    assert torch.equal(quantized.indices, codes)
    assert torch.allclose(model.quantizer.embed(codes), quantized.quantized, atol=1e-6)
    assert model.decode(codes).shape == images.shape
    with pytest.raises(ValueError, match="product of quantizer.fsq_levels"):
        preset("tiny").with_overrides({"quantizer.kind": "fsq", "quantizer.fsq_levels": [4, 4]}).validate()


def test_stability_metrics_by_construction():
    images = torch.rand(3, 3, 16, 16) * 2 - 1  # SSIM's window is 11 px
    noisy = perturb(images, seed=0)
    # every value moves exactly one 8-bit level (2/255 in [-1, 1]) unless clamped at the range's edge
    step = (noisy - images).abs()
    assert torch.allclose(step[(images.abs() < 0.99)], torch.tensor(2 / 255), atol=1e-6)
    assert torch.equal(perturb(images, seed=0), noisy)
    assert torch.allclose(as_8bit(images), ((images + 1) * 127.5).round() / 127.5 - 1)
    model = _tiny()
    metrics = reconstruction_metrics(model, images, batch_size=2)
    codes = model.encode(images)
    noisy_codes = torch.cat([model.encode(perturb(images[:2], seed=0)), model.encode(perturb(images[2:], seed=2))])
    assert metrics["stability_noise"] == agreement(codes, noisy_codes)  # batches are perturbed with seed = first index
    assert metrics["stability_reencode"] == agreement(codes, model.encode(as_8bit(model.decode(codes).clamp(-1, 1))))


def test_reconstruction_metrics_with_region_labels(tmp_path):
    model = _tiny(**{"model.encoder_context": "patch"})
    # 4 pictures of two flat colours in a 2x2 layout of 8x8 regions; equal regions -> equal codes (patch encoder)
    red, blue = torch.tensor([0.8, -0.8, -0.8]), torch.tensor([-0.8, -0.8, 0.8])
    layouts = [["red", "blue"], ["blue", "red"]], [["red", "red"], ["blue", "blue"]]
    pictures, labels = [], []
    for layout in layouts * 2:
        picture = torch.empty(3, 16, 16)
        for r in range(2):
            for c in range(2):
                picture[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = (red if layout[r][c] == "red" else blue)[:, None, None]
        pictures.append(picture)
        labels.append(layout)
    metrics = reconstruction_metrics(model, torch.stack(pictures), labels=labels)
    assert metrics["content"]["code_given_label"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["content"]["majority_share"] == 1.0
    # region labels files: read back, and refused by name when malformed
    file = tmp_path / "labels.jsonl"
    file.write_text(json.dumps({"image": "a.png", "cells": [["x", "y"]]}) + "\n")
    assert read_region_labels(file) == {(tmp_path / "a.png").resolve(): [["x", "y"]]}
    file.write_text(json.dumps({"image": "a.png", "cells": [["x"], ["y", "z"]]}) + "\n")
    with pytest.raises(ValueError, match=r"labels.jsonl:1: 'cells' must be"):
        read_region_labels(file)
    file.write_text(json.dumps({"image": "a.png", "cells": [["x"]], "extra": 1}) + "\n")
    with pytest.raises(ValueError, match=r"labels.jsonl:1: expected exactly"):
        read_region_labels(file)


def test_kmeans_plus_plus_gives_each_content_one_code():
    from vqtok.quantizer import kmeans_plus_plus

    generator = torch.Generator().manual_seed(0)
    # a background that fills most of the data, a rare content, and scattered photo-like vectors
    vectors = torch.cat([torch.zeros(2000, 4), torch.ones(12, 4), torch.randn(300, 4, generator=generator) + 4])
    centres, sizes = kmeans_plus_plus(vectors, 32, iterations=5)
    assert centres.shape == (32, 4) and sizes.sum() == len(vectors)
    at_zero = (centres.norm(dim=-1) < 1e-6).sum()
    assert at_zero == 1  # random seeding would start many codes on the background; one wins, the rest sit beside it
    nearest = torch.cdist(torch.stack([torch.zeros(4), torch.ones(4)]), centres).argmin(-1)
    assert sizes[nearest[0]] == 2000 and sizes[nearest[1]] == 12  # the rare content has a code of its own
    # fewer distinct vectors than codes: the spare codes sit far outside the data, where nothing reaches them
    centres, sizes = kmeans_plus_plus(torch.cat([torch.zeros(50, 3), torch.ones(5, 3)]), 8, iterations=3)
    assert sorted(sizes.tolist()) == [0] * 6 + [5, 50]
    assert torch.cdist(torch.stack([torch.zeros(3), torch.ones(3)]), centres).min(-1).values.max() < 1e-6
    assert centres[sizes == 0].norm(dim=-1).min() > 5


def test_revival_from_the_worst_fit_latents():
    model = _tiny(**{"quantizer.revive_from": "worst", "quantizer.dead_code_threshold": 0.5})
    codebook = model.quantizer.vq._codebook
    assert codebook.replace_sample_fn == model.quantizer._worst_fit
    live = torch.zeros(64, dtype=torch.bool)
    live[:2] = True
    codebook.embed.data[0, :2] = torch.tensor([[0.0] * 4, [1.0] * 4])
    codebook.cluster_size.data[0] = live.float()
    samples = torch.tensor([[0.1] * 4, [5.0] * 4, [0.0] * 4, [5.0] * 4, [2.0] * 4])[None]
    seeds = model.quantizer._worst_fit(samples, 3)[0]
    # distinct samples, farthest from a live code first: 5 (dist 8), 2 (2), 0.1 (0.2)
    assert torch.equal(seeds, torch.tensor([[5.0] * 4, [2.0] * 4, [0.1] * 4]))
    assert model.quantizer._worst_fit(samples, 6)[0].shape == (6, 4)  # more dead codes than distinct samples
    with pytest.raises(ValueError, match="revive_from"):
        preset("tiny").with_overrides({"quantizer.revive_from": "oldest"}).validate()


def test_autoencoder_warm_up_then_kmeans_on_its_latents(tmp_path, image_folder):
    from vqtok.data import resolve_image_paths
    from vqtok.train import Trainer

    config = preset("tiny").with_overrides({"train.steps": 6, "train.quantizer_warmup_steps": 3,
                                            "quantizer.kmeans_init": True, "train.checkpoint_every": 3,
                                            "train.sample_every": 100}).validate()
    paths = resolve_image_paths(image_folder)
    trainer = Trainer(config, tmp_path / "run", paths, [])
    trainer.train(steps=3)
    assert trainer.usage.filled == 0 and trainer.model.quantizer.needs_initialisation  # nothing quantized yet
    trainer.train()
    assert trainer.usage.filled > 0 and not trainer.model.quantizer.needs_initialisation
    resumed = Trainer(config, tmp_path / "run", paths, [])
    assert resumed.resume() and resumed.step == 6 and not resumed.model.quantizer.needs_initialisation
