"""Nearest-code lookup (the single inference path) against brute force and against vector-quantize-pytorch."""
from __future__ import annotations

import pytest
import torch

from vqtok.config import QuantizerConfig
from vqtok.lookup import nearest_code
from vqtok.quantizer import VectorQuantizer


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 7, 3), (300, 64, 8), (1025, 513, 16)])
def test_nearest_code_matches_brute_force(metric, n, k, d):
    generator = torch.Generator().manual_seed(n * k + d)
    vectors = torch.randn(n, d, generator=generator)
    codes = torch.randn(k, d, generator=generator)
    if metric == "cosine":
        vectors, codes = torch.nn.functional.normalize(vectors, dim=1), torch.nn.functional.normalize(codes, dim=1)
        expected = (vectors.double() @ codes.double().T).argmax(1)
    else:
        expected = torch.cdist(vectors.double(), codes.double()).argmin(1)
    got = nearest_code(vectors, codes, metric, chunk_size=128)
    assert got.dtype == torch.long and got.shape == (n,)
    assert torch.equal(got, expected)


def test_nearest_code_ties_take_lowest_index_and_half_inputs():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    vectors = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    assert nearest_code(vectors, codes).tolist() == [0, 0, 1]
    assert nearest_code(vectors.bfloat16(), codes.bfloat16()).tolist() == [0, 0, 1]


def test_nearest_code_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not match"):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="unknown metric"):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 4), metric="l1")


@pytest.mark.parametrize("config", [
    QuantizerConfig(codebook_size=32, embed_dim=16, ema=False, kmeans_init=False, dead_code_threshold=0),
    QuantizerConfig(codebook_size=32, embed_dim=16, kmeans_init=True, dead_code_threshold=0.5),
    QuantizerConfig(codebook_size=32, embed_dim=16, codebook_dim=4, l2_normalized=True, kmeans_init=False),
], ids=["plain", "ema_kmeans", "l2_lowdim"])
def test_inference_indices_equal_library_forward(config):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(config)
    latents = torch.randn(2, 16, 5, 6)
    quantizer.train()
    quantizer(latents)  # k-means init / EMA step so the codebook is not the initial one
    quantizer.eval()
    _, library_indices, _ = quantizer.vq(latents)
    ours = quantizer.indices(latents)
    assert ours.shape == (2, 5, 6)
    assert torch.equal(ours, library_indices)
    # embed() gives the decoder exactly what the library's forward gives it
    library_quantized, _, _ = quantizer.vq(latents)
    torch.testing.assert_close(quantizer.embed(ours), library_quantized, rtol=1e-5, atol=1e-5)


def test_embed_rejects_out_of_range_codes():
    quantizer = VectorQuantizer(QuantizerConfig(codebook_size=8, embed_dim=4, kmeans_init=False))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        quantizer.embed(torch.tensor([[[8]]]))
