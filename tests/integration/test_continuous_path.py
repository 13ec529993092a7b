"""The continuous encoder-adapter path: pixels beside packed rows, placeholder splicing, staged training through
the DeepSpeed entry (frozen parts get no optimizer state), and the sampler reading continuous prompt pictures."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_lm.data.packing import PackedDataset
from unified_lm.data.prepare import PrepareSettings, prepare
from unified_lm.generate.sampler import Sampler
from unified_lm.generate.sampling import SamplingConfig
from unified_lm.generate.segments import ContinuousPicture, Prompt
from unified_lm.model.config import preset
from unified_lm.model.transformer import Pictures, UnifiedTransformer
from unified_lm.tokens.vocab import Vocabulary
from unified_lm.vision.contrastive import encoder_preset
from vqtok.images import load_rgb, preprocess

PLACEHOLDERS = 16  # the tiny encoder's 4x4 patch grid at 32 px


@pytest.fixture(scope="session")
def continuous_data(lm_data, tmp_path_factory):
    """Caption and question documents of the test world as a continuous-path packed dataset."""
    out = tmp_path_factory.mktemp("continuous") / "packed"
    info = prepare([str(lm_data.documents)], str(lm_data.vocab_dir), str(out),
                   PrepareSettings(seq_len=64, rows_per_shard=16, kinds=("image_to_text", "qa"), picture_size=32,
                                   placeholders=PLACEHOLDERS))
    return out, info


def tiny_picture_model(vocab: Vocabulary, pool: int = 1, seed: int = 0) -> UnifiedTransformer:
    config = preset("tiny")
    config.model.vocab_size = vocab.size
    config.model.picture.encoder = asdict(encoder_preset("tiny").vision)
    config.model.picture.pool = pool
    torch.manual_seed(seed)
    return UnifiedTransformer(config.model)


def test_prepare_writes_placeholders_and_the_pictures_pixels(lm_data, continuous_data):
    out, info = continuous_data
    assert info["pictures"]["placeholders"] == PLACEHOLDERS and info["image_grids"] == {}
    dataset = PackedDataset(out)
    special = lm_data.vocab.special
    sources = {}
    for line in lm_data.documents.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] in ("image_to_text", "qa"):
            sources[record["segments"][0]["image"]] = record
    seen = 0
    for index in range(len(dataset)):
        row = dataset[index]
        placeholder = row.tokens == special.image
        assert (row.pictures[placeholder] >= 0).all() and (row.pictures[~placeholder] == -1).all()
        assert not row.loss[placeholder].any()  # a continuous picture is input, never a target
        seen += int(placeholder.sum())
    assert seen == info["pictures"]["count"] * PLACEHOLDERS  # every picture's placeholders, none lost or doubled
    # the stored pixels are the picture files as the encoder sees them, in document order of first use
    first = next(iter(sources))
    expected = preprocess(load_rgb(lm_data.world / first), 32)
    assert np.array_equal(dataset.pixels[0], expected) or any(
        np.array_equal(dataset.pixels[n], expected) for n in range(len(dataset.pixels)))


def test_batch_slots_address_the_batch_pictures(continuous_data):
    dataset = PackedDataset(continuous_data[0])
    batch = dataset.batch([0, 3, 5])
    rows = [dataset[i] for i in (0, 3, 5)]
    for row_number, row in enumerate(rows):
        slots = row.pictures[:-1]
        used = slots >= 0
        local = batch.picture_slots[row_number][torch.from_numpy(used)]
        # the same picture and patch: pixels of the local picture equal the global picture's pixels
        for global_slot, local_slot in zip(slots[used], local.tolist()):
            assert global_slot % PLACEHOLDERS == local_slot % PLACEHOLDERS
            stored = torch.from_numpy(np.array(dataset.pixels[global_slot // PLACEHOLDERS])).permute(2, 0, 1)
            assert torch.allclose(batch.pixels[local_slot // PLACEHOLDERS], stored.float() / 127.5 - 1)


def test_placeholder_splicing_puts_each_feature_at_its_position(lm_data):
    model = tiny_picture_model(lm_data.vocab, pool=2).eval()
    placeholders = model.picture_adapter.placeholders(32)
    assert placeholders == 4  # 4x4 patches pooled by 2
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    slots = torch.full((2, 20), -1)
    slots[0, 2:6] = torch.arange(4) + 2 * placeholders  # picture 2 in row 0
    slots[1, 10:14] = torch.arange(4)  # picture 0 in row 1, then picture 1 split at the row's end
    slots[1, 18:20] = torch.tensor([4, 5])
    mask, embeddings = model.picture_embeddings(Pictures(slots=slots, pixels=pixels))
    features = model.picture_adapter(pixels)
    expected = torch.cat([features[2], features[0], features[1, :2]])
    torch.testing.assert_close(embeddings, expected)
    tokens = torch.randint(0, 300, (2, 20))
    spliced = model.embed_tokens(tokens, pictures=Pictures(mask=mask, embeddings=embeddings))
    torch.testing.assert_close(spliced[0, 2:6], features[2])
    torch.testing.assert_close(spliced[1, 18:20], features[1, :2])
    torch.testing.assert_close(spliced[0, :2], model.embed(tokens[0, :2]))  # other positions keep their tokens


def test_placeholder_count_mismatch_is_refused(lm_data):
    model = tiny_picture_model(lm_data.vocab)
    with pytest.raises(ValueError, match="picture embeddings must have shape"):
        model.embed_tokens(torch.zeros(1, 8, dtype=torch.long),
                           pictures=Pictures(mask=torch.ones(1, 8, dtype=torch.bool),
                                             embeddings=torch.zeros(5, model.config.dim)))
    plain = UnifiedTransformer(preset("tiny").model.__class__(vocab_size=lm_data.vocab.size, dim=64, n_layers=1,
                                                              n_heads=4, n_kv_heads=2, max_seq_len=64))
    with pytest.raises(ValueError, match="no picture encoder"):
        plain(torch.zeros(1, 4, dtype=torch.long),
              pictures=Pictures(slots=torch.zeros(1, 4, dtype=torch.long), pixels=torch.zeros(1, 3, 32, 32)))


def test_sampler_reads_continuous_prompt_pictures(lm_data):
    model = tiny_picture_model(lm_data.vocab).eval()
    vocab = lm_data.vocab
    pixels = torch.rand(3, 32, 32) * 2 - 1
    prompt = Prompt([ContinuousPicture(pixels), "Question: what colour is the shape?"])
    sampler = Sampler(model, vocab, None, static=False)
    config = SamplingConfig.from_dict({"mode": "understanding", "max_new_tokens": 4, "seed": 1,
                                       "text": {"temperature": 0.0}})
    document = sampler.generate([prompt], config)[0]
    assert document.prompt[0].kind == "image" and document.prompt[0].codes is None
    assert document.prompt[0].pixels.shape == (32, 32, 3)
    # the prefill with spliced features gives the logits of a full forward with the same pictures
    ids = sampler.encode_prompt(prompt, "understanding")
    tokens = torch.tensor([ids])
    slots = torch.full_like(tokens, -1)
    slots[tokens == vocab.special.image] = torch.arange(PLACEHOLDERS)
    full = model(tokens, pictures=Pictures(slots=slots, pixels=pixels[None]))[0, -1]
    logits = []
    sampler.generate([prompt], config, logits_processor=lambda x: logits.append(x.clone()) or x)
    torch.testing.assert_close(logits[0][0], full, rtol=1e-5, atol=1e-5)
    plain = Sampler(UnifiedTransformer(model.config.__class__(**{**model.config.__dict__, "picture":
                                                                  type(model.config.picture)()})).eval(),
                    vocab, None, static=False)
    with pytest.raises(ValueError, match="needs a model with a picture encoder"):
        plain.generate([prompt], config)


@pytest.fixture(scope="session")
def encoder_run(lm_data, tmp_path_factory):
    """A `tiny` image encoder trained for 4 steps on the test world (its run directory)."""
    from unified_lm.train.encoder import EncoderTrainer

    run = tmp_path_factory.mktemp("encoder") / "run"
    config = encoder_preset("tiny").with_overrides({"train.steps": 4, "train.checkpoint_every": 4})
    EncoderTrainer(config.for_vocabulary(lm_data.vocab), lm_data.world, lm_data.vocab_dir, run).train()
    return run


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from unified_lm.model.checkpoint import resolve_run

    return load_file(resolve_run(run) / "model.safetensors")


def fixed_batch_loss(run: Path, data: Path, initial: bool = False) -> float:
    """The loss on the dataset's first 16 rows of the run's final weights, or of the weights it started from
    (`untrained_model` rebuilds them: seeded init, then train.encoder_run and train.init_from)."""
    from unified_lm.model.checkpoint import load_model
    from unified_lm.train.engine import micro_batch_loss
    from unified_lm.train.initial import untrained_model

    loaded = load_model(run)
    model = untrained_model(loaded.config) if initial else loaded.model
    dataset = PackedDataset(data)
    batch = dataset.batch(list(range(min(16, len(dataset)))))
    with torch.no_grad():
        return float(micro_batch_loss(model.eval(), batch).loss)


STAGE = ["--set", "train.steps=6", "--set", "train.checkpoint_every=6", "--set", "train.micro_batch_size=4"]
LONGER = ["--set", "train.steps=16", "--set", "train.checkpoint_every=16", "--set", "train.micro_batch_size=8"]


@pytest.mark.slow
def test_stage1_trains_only_the_adapter_and_stage2_lowers_the_loss(lm_data, continuous_data, encoder_run,
                                                                   tmp_path, train_unified):
    base = tmp_path / "base"  # a language model trained briefly on the discrete data: the stages start from it
    train_unified(lm_data.packed, base, *STAGE)
    stage1 = tmp_path / "stage1"
    result = train_unified(continuous_data[0], stage1, *LONGER, "--set", f"train.init_from={base}", "--set",
                   f"train.encoder_run={encoder_run}", "--set", "train.freeze_lm=true")
    assert "trainable" in result.stdout
    before, after = weights(base), weights(stage1)
    from unified_lm.vision.contrastive import load_encoder

    encoder = load_encoder(encoder_run)[0].vision.state_dict()
    for name, tensor in after.items():
        if name.startswith("picture_adapter.adapter."):
            continue
        reference = encoder[name.removeprefix("picture_adapter.encoder.")] if name.startswith(
            "picture_adapter.encoder.") else before[name]
        assert torch.equal(tensor, reference), f"{name} changed in stage 1"
    changed = [n for n in after if n.startswith("picture_adapter.adapter.")]
    assert fixed_batch_loss(stage1, continuous_data[0]) < fixed_batch_loss(stage1, continuous_data[0], initial=True)
    # frozen parameters have no optimizer state: only the adapter's tensors went into the optimizer
    from unified_lm.model.checkpoint import resolve_run

    meta = json.loads((resolve_run(stage1) / "meta.json").read_text())
    assert meta["trainable_parameters"] == sum(after[n].numel() for n in changed)

    stage2 = tmp_path / "stage2"
    train_unified(continuous_data[0], stage2, *LONGER, "--set", f"train.init_from={stage1}")
    stage2_weights = weights(stage2)
    query = "layers.0.attention.q_proj.weight"
    assert not torch.equal(stage2_weights[query], after[query])  # the language model trains in stage 2
    for name in stage2_weights:  # the encoder stays frozen (encoder_lr_scale 0)
        if name.startswith("picture_adapter.encoder."):
            assert torch.equal(stage2_weights[name], after[name])
    assert fixed_batch_loss(stage2, continuous_data[0]) < fixed_batch_loss(stage2, continuous_data[0], initial=True)


@pytest.mark.slow
def test_placeholder_mismatch_and_missing_encoder_are_clear_errors(lm_data, continuous_data, encoder_run, tmp_path, train_unified):
    result = train_unified(continuous_data[0], tmp_path / "none", *STAGE, check=False)
    assert result.returncode == 2 and "holds continuous pictures" in result.stderr, result.stderr[-2000:]
    result = train_unified(continuous_data[0], tmp_path / "pooled", *STAGE, "--set", f"train.encoder_run={encoder_run}",
                   "--set", "model.picture.pool=2", check=False)
    assert result.returncode == 2 and "16 <image> placeholders per picture" in result.stderr, result.stderr[-2000:]


def test_prepare_cli_takes_the_placeholder_count_from_the_encoder(lm_data, encoder_run, tmp_path, capsys):
    from unified_lm.cli import main

    out = tmp_path / "packed"
    arguments = ["prepare", str(lm_data.documents), "--vocab", str(lm_data.vocab_dir), "--out", str(out),
                 "--seq-len", "64", "--kinds", "qa", "--encoder", str(encoder_run)]
    assert main(arguments + ["--pool", "3"]) == 2 and "--pool 3 must divide" in capsys.readouterr().err
    assert main(arguments + ["--pool", "2"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["pictures"]["placeholders"] == 4 and info["kinds"] == ["qa"]
    assert main(arguments[:-2] + ["--kinds", "no_such_kind"]) == 2
    assert "no documents of kind ['no_such_kind']" in capsys.readouterr().err


def test_a_bf16_model_takes_fp32_pixels(lm_data):
    """DeepSpeed's bf16 engine casts the model, not the batch: the picture path casts the pixels itself."""
    model = tiny_picture_model(lm_data.vocab).to(torch.bfloat16).eval()
    slots = torch.full((1, 20), -1)
    slots[0, 2:18] = torch.arange(PLACEHOLDERS)
    tokens = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        logits = model(tokens, pictures=Pictures(slots=slots, pixels=torch.rand(1, 3, 32, 32) * 2 - 1))
    assert torch.isfinite(logits).all()
