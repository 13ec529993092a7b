"""The unified transformer: shapes, QK-norm / norm reordering variants, z-loss, packed-sequence isolation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import attention_reference, document_causal_mask
from unified_lm.model.config import UnifiedConfig, load_config, preset
from unified_lm.model.transformer import (
    HeadLayerNorm,
    KVCache,
    Pictures,
    Targets,
    UnifiedTransformer,
    positions_in_documents,
)

VOCAB = 97


def tiny_model(**changes) -> UnifiedTransformer:
    config = preset("tiny").model
    config.vocab_size = VOCAB
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return UnifiedTransformer(config)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("norm_reordering", [True, False])
def test_forward_backward_shapes(qk_norm, norm_reordering):
    model = tiny_model(qk_norm=qk_norm, norm_reordering=norm_reordering)
    assert (model.layers[0].attention.q_norm is not None) == qk_norm
    tokens = torch.randint(0, VOCAB, (3, 40))
    logits = model(tokens)
    assert logits.shape == (3, 40, VOCAB)
    code_positions = torch.where(tokens > 60, torch.arange(40).expand(3, 40), -1)  # ids > 60 play picture codes
    output = model(tokens, code_positions=code_positions,
                   targets=Targets(tokens.roll(-1, 1), in_picture=tokens > 60, layer_stats=True))
    assert output.loss.shape == () and torch.isfinite(output.loss)
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.0.attention.q_proj.weight"].abs().sum() > 0
    assert len(output.layer_stats) == 2 and all(s["max_qk_logit"] > 0 and s["output_rms"] > 0 for s in output.layer_stats)
    assert int(output.tokens.sum()) == 3 * 40


def test_norm_reordering_changes_the_computation():
    tokens = torch.randint(0, VOCAB, (2, 16))
    plain, reordered = tiny_model(norm_reordering=False), tiny_model(norm_reordering=True)
    reordered.load_state_dict(plain.state_dict())  # same weights, different wiring
    assert not torch.allclose(plain(tokens), reordered(tokens))


def test_qk_norm_is_layernorm_over_head_dim_with_per_head_affine():
    norm = HeadLayerNorm(3, 8, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 3, 8)
    expected = torch.stack([F.layer_norm(x[:, :, h], (8,), norm.weight[h], norm.bias[h], 1e-5) for h in range(3)], 2)
    torch.testing.assert_close(norm(x), expected)


def test_z_loss_matches_hand_computation():
    model = tiny_model(z_loss_weight=0.3)  # large weight so the term is visible
    tokens = torch.randint(0, VOCAB, (2, 12))
    targets = torch.randint(0, VOCAB, (2, 12))
    mask = torch.rand(2, 12) > 0.3
    image = targets > 50
    logits = model(tokens).reshape(-1, VOCAB).double()
    log_z = torch.logsumexp(logits, -1)
    ce = log_z - logits.gather(1, targets.reshape(-1, 1)).squeeze(1)
    flat_mask, flat_image = mask.reshape(-1).double(), image.reshape(-1).double()
    count = flat_mask.sum()
    expected_loss = ((ce + 0.3 * log_z**2) * flat_mask).sum() / count
    output = model(tokens, targets=Targets(targets, mask, image))
    torch.testing.assert_close(output.loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.z_loss.double(), (0.3 * log_z**2 * flat_mask).sum() / count, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.log_z.double(), (log_z * flat_mask).sum() / count, rtol=1e-5, atol=1e-5)
    image_mask = flat_mask * flat_image
    torch.testing.assert_close(output.image_loss.double(), (ce * image_mask).sum() / image_mask.sum(), rtol=1e-5, atol=1e-5)
    text_mask = flat_mask * (1 - flat_image)
    torch.testing.assert_close(output.text_loss.double(), (ce * text_mask).sum() / text_mask.sum(), rtol=1e-5, atol=1e-5)


def test_loss_denominator_weighs_every_target_token_equally():
    """Two micro-batches with their share of the step's target count average to the full batch's loss."""
    model = tiny_model()
    tokens, targets = torch.randint(0, VOCAB, (4, 12)), torch.randint(0, VOCAB, (4, 12))
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:2, :2] = True  # 4 targets in the first half
    mask[2:, :] = True  # 24 in the second
    full = model(tokens, targets=Targets(targets, mask)).loss
    share = mask.sum() / 2
    halves = [model(tokens[rows], targets=Targets(targets[rows], mask[rows], denominator=share)).loss
              for rows in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full)
    naive = [model(tokens[rows], targets=Targets(targets[rows], mask[rows])).loss for rows in (slice(0, 2), slice(2, 4))]
    assert not torch.allclose((naive[0] + naive[1]) / 2, full)  # per-micro-batch means would not


def test_rope_tables_are_exact_and_never_cast():
    from unified_lm.model.transformer import rope_table

    model = tiny_model()
    cos, sin = model.rope(torch.device("cpu"))
    assert cos.dtype == torch.float32 and "rope" not in "".join(model.state_dict())
    positions = torch.arange(model.config.max_seq_len, dtype=torch.float64)
    frequencies = 10_000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    torch.testing.assert_close(cos, torch.cos(positions[:, None] * frequencies).float())
    model.to(torch.bfloat16)  # a bf16 engine converts parameters and buffers; the table stays fp32
    assert model.rope(torch.device("cpu"))[1].dtype == torch.float32
    assert rope_table(16, 8, 10_000.0)[0].shape == (8, 8)


def test_no_token_attends_to_an_earlier_document():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, 30))
    documents = torch.tensor([[1] * 10 + [2] * 12 + [3] * 8])
    perturbed = tokens.clone()
    perturbed[0, :10] = torch.randint(0, VOCAB, (10,))  # change document 1 only
    perturbed[0, 22:] = torch.randint(0, VOCAB, (8,))  # and document 3 (later) only
    a = model(tokens, document_ids=documents)
    b = model(perturbed, document_ids=documents)
    torch.testing.assert_close(a[0, 10:22], b[0, 10:22])  # document 2 sees neither
    assert not torch.allclose(a[0, :10], b[0, :10])
    # and document 2 packed after document 1 equals document 2 alone at the start of a row
    alone = model(tokens[:, 10:22])
    torch.testing.assert_close(a[0, 10:22], alone[0], rtol=1e-4, atol=1e-5)
    # without document ids the same row does mix: the check above is not vacuous
    assert not torch.allclose(model(tokens)[0, 10:22], alone[0], atol=1e-4)


def test_attention_reference_mask_and_gqa():
    documents = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = document_causal_mask(documents)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out = attention_reference(q, k, v, documents.expand(2, 6))
    manual = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                            attn_mask=document_causal_mask(documents.expand(2, 6)))
    torch.testing.assert_close(out, manual)


def test_positions_restart_per_document():
    documents = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert positions_in_documents(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_splice_embeddings_at_placeholders():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 10))
    splice = torch.zeros(2, 10, dtype=torch.bool)
    splice[0, 2:5] = True
    splice[1, 7] = True
    vectors = torch.randn(4, model.config.dim, requires_grad=True)
    embedded = model.embed_tokens(tokens, pictures=Pictures(mask=splice, embeddings=vectors))
    torch.testing.assert_close(embedded[splice], vectors)
    torch.testing.assert_close(embedded[~splice], model.embed(tokens)[~splice])
    model(tokens, pictures=Pictures(mask=splice, embeddings=vectors), targets=Targets(tokens)).loss.backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0  # the adapter path trains through it
    with pytest.raises(ValueError, match=r"picture embeddings must have shape \(4, 64\)"):
        model.embed_tokens(tokens, pictures=Pictures(mask=splice, embeddings=torch.randn(3, model.config.dim)))


def test_dropout_only_in_training_mode():
    model = tiny_model(dropout=0.3)
    tokens = torch.randint(0, VOCAB, (2, 16))
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens))


def test_tied_embeddings_share_the_matrix():
    model = tiny_model(tied_embeddings=True)
    assert model.lm_head.weight is None and "lm_head.weight" not in model.state_dict()
    assert sum(p is model.embed.weight for p in model.parameters()) == 1
    head_inputs = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_inputs.append(args[0]))
    tokens = torch.randint(0, VOCAB, (2, 8))
    logits = model(tokens)
    torch.testing.assert_close(logits.reshape(-1, VOCAB), F.linear(head_inputs[0], model.embed.weight))
    model(tokens, targets=Targets(tokens)).loss.backward()  # the loss reaches the embedding through the head too
    looked_up = torch.zeros(VOCAB, dtype=torch.bool)
    looked_up[tokens.unique()] = True
    assert model.embed.weight.grad[~looked_up].abs().sum() > 0  # rows no token looked up: only the head's gradient


def test_pictures_come_one_way_at_a_time():
    """The model's one picture input: pixels at slots or ready embeddings at a mask, refused when both or half."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (1, 8))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 2:4] = True
    slots = torch.where(mask, torch.arange(8), -1)
    pixels, embeddings = torch.zeros(1, 3, 32, 32), torch.randn(2, model.config.dim)
    with pytest.raises(ValueError, match="either as slots \\+ pixels .* or as mask \\+ embeddings .*, not both"):
        model(tokens, pictures=Pictures(slots=slots, pixels=pixels, mask=mask, embeddings=embeddings))
    with pytest.raises(ValueError, match="mask and embeddings together"):
        model(tokens, pictures=Pictures(mask=mask))
    with pytest.raises(ValueError, match="slots and pixels together"):
        model(tokens, pictures=Pictures(pixels=pixels))
    with pytest.raises(TypeError, match="splice_mask"):  # the old second way in is gone
        model(tokens, splice_mask=mask, splice_embeddings=embeddings)
    with pytest.raises(ValueError, match="mask and embeddings together"):  # decode keeps its arguments, same check
        model.decode(tokens, KVCache.allocate(model.config, 1, 8), torch.arange(8)[None], splice_mask=mask)
    spliced = model(tokens, pictures=Pictures(mask=mask, embeddings=embeddings))
    assert not torch.allclose(spliced[0, 2:], model(tokens)[0, 2:])  # the pictures change what follows them


def test_training_extras_only_with_targets():
    """Without targets the forward returns logits alone; layer stats are measured only when asked for."""
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 8))
    assert isinstance(model(tokens), torch.Tensor)
    assert model(tokens, targets=Targets(tokens)).layer_stats == []
    assert len(model(tokens, targets=Targets(tokens, layer_stats=True)).layer_stats) == model.config.n_layers


@pytest.mark.parametrize("override, message", [
    ({"model.dim": 66}, "divisible by model.n_heads"),
    ({"model.n_kv_heads": 3}, "multiple of model.n_kv_heads"),
    ({"train.schedule": "linear"}, "train.schedule"),
    ({"model.dropout": 1.5}, "model.dropout"),
    ({"train.seq_len": 4096}, "exceeds model.max_seq_len"),
])
def test_bad_configs_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny").with_overrides(override).validate()


def test_unknown_config_keys_and_types(tmp_path):
    with pytest.raises(ValueError, match="unknown config field 'model.width'"):
        preset("small").with_overrides({"model.width": 3})
    with pytest.raises(ValueError, match=r"model.qk_norm: expected true/false"):
        UnifiedConfig.from_dict({"model": {"qk_norm": "yes"}})
    with pytest.raises(ValueError, match="neither a preset"):
        load_config(str(tmp_path / "missing.json"))
    path = tmp_path / "config.json"
    path.write_text('{"preset": "tiny", "model": {"n_layers": 3}}')
    assert load_config(str(path)).model.n_layers == 3
    with pytest.raises(ValueError, match="vocab_size must be set"):
        UnifiedTransformer(preset("tiny").model)


@pytest.mark.parametrize("norm_reordering", [False, True])
def test_cached_decoding_equals_full_recomputation(norm_reordering):
    """A batch of left-padded prompts of different lengths, prefilled then decoded token by token through the KV
    cache, gives the logits of a full forward over each row's real tokens alone (fp32, 1e-5)."""
    model = tiny_model(norm_reordering=norm_reordering).eval()
    lengths, steps = [5, 9, 3], 6
    width = max(lengths)
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, VOCAB, (n + steps,), generator=generator) for n in lengths]
    prompt = torch.zeros(3, width, dtype=torch.long)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        prompt[row, width - n :] = sequences[row][:n]
        valid[row, width - n :] = True
    positions = torch.arange(width)[None] - (width - torch.tensor(lengths))[:, None]
    cache = KVCache.allocate(model.config, 3, width + steps)
    logits = model.decode(prompt, cache, positions, valid)
    for row, n in enumerate(lengths):
        full = model(sequences[row][None, :n])[0]
        torch.testing.assert_close(logits[row, width - n :], full, rtol=1e-5, atol=1e-5)
    for step in range(steps):
        new = torch.stack([sequences[row][n + step] for row, n in enumerate(lengths)])[:, None]
        step_positions = torch.tensor(lengths)[:, None] + step
        logits = model.decode(new, cache, step_positions)
        for row, n in enumerate(lengths):
            full = model(sequences[row][None, : n + step + 1])[0, -1]
            torch.testing.assert_close(logits[row, 0], full, rtol=1e-5, atol=1e-5)
    assert cache.length == width + steps
    with pytest.raises(ValueError, match="KV cache holds 15 slots"):
        model.decode(new, cache, step_positions + 1)
