"""The contrastive image encoder: losses against hand computations, the ViT's position-table interpolation, the
text tower's padding mask, training (log, checkpoints, exact resume), zero-shot, bad inputs and the CLI."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_lm import cli
from unified_lm.tokens.vocab import Vocabulary, build_vocabulary
from unified_lm.train.encoder import EncoderTrainer, batch_indices, zero_shot
from unified_lm.vision.contrastive import (
    ContrastiveModel,
    TextEncoder,
    encoder_preset,
    encoder_vocabulary,
    load_encoder,
    load_pictures,
    tokenize_captions,
)
from unified_lm.vision.encoder import VisionEncoder
from unified_lm.vision.losses import info_nce_loss, sigmoid_loss
from unified_lm.world.corpus import COLOURS, SHAPES, generate_world, world_texts

STEPS = 24  # the tiny training run: long enough for the loss to fall, short enough for a CPU test


@pytest.fixture(scope="module")
def data(tmp_path_factory, random_codes_tokenizer):
    """A 32 px world with enough held-out one-object pictures for zero-shot, and its vocabulary."""
    root = tmp_path_factory.mktemp("encoder")
    world = generate_world(root / "world", num_scenes=300, seed=1, image_size=32, heldout_fraction=0.3).out_dir
    vocab = build_vocabulary(root / "vocab", world_texts(world, split="train"), 400, 64, random_codes_tokenizer)
    return root, world, root / "vocab", vocab


def tiny_config(**overrides):
    settings = {"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 8, "train.keep_checkpoints": 5,
                "train.batch_size": 32}
    return encoder_preset("tiny").with_overrides(settings | overrides)


@pytest.fixture(scope="module")
def run(data):
    root, world, vocab_dir, _ = data
    out = root / "run"
    result = EncoderTrainer(tiny_config(), world, vocab_dir, out).train()
    return out, result


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -- losses -------------------------------------------------------------------------------------------------------

def random_embeddings(batch: int = 5, dim: int = 7, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    return x, y


def with_duplicate(batch: int) -> torch.Tensor:
    positives = torch.eye(batch, dtype=torch.bool)
    positives[1, 3] = positives[3, 1] = True  # pictures 1 and 3 have the same caption
    return positives


@pytest.mark.parametrize("duplicates", [False, True])
def test_sigmoid_loss_matches_a_loop_over_pairs(duplicates):
    x, y = random_embeddings()
    log_t, bias = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    positives = with_duplicate(5) if duplicates else torch.eye(5, dtype=torch.bool)
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if positives[i, j] else -1.0
            logit = math.exp(log_t.item()) * float(x[i] @ y[j]) + bias.item()
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    loss = sigmoid_loss(x, y, log_t, bias, positives if duplicates else None)
    assert loss.item() == pytest.approx(total / 5, rel=1e-12)


@pytest.mark.parametrize("duplicates", [False, True])
def test_info_nce_loss_matches_a_loop_over_rows_and_columns(duplicates):
    x, y = random_embeddings(seed=1)
    log_t = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    positives = with_duplicate(5) if duplicates else torch.eye(5, dtype=torch.bool)
    s = [[math.exp(log_t.item()) * float(x[i] @ y[j]) for j in range(5)] for i in range(5)]
    rows = columns = 0.0
    for i in range(5):
        matches = [j for j in range(5) if positives[i, j]]
        row_norm = math.log(sum(math.exp(s[i][j]) for j in range(5)))
        rows += -sum(s[i][j] - row_norm for j in matches) / len(matches)
        column_norm = math.log(sum(math.exp(s[j][i]) for j in range(5)))
        columns += -sum(s[j][i] - column_norm for j in matches) / len(matches)  # positives is symmetric
    loss = info_nce_loss(x, y, log_t, positives if duplicates else None)
    assert loss.item() == pytest.approx((rows / 5 + columns / 5) / 2, rel=1e-12)


def test_loss_initialisation_and_duplicate_captions(data):
    vocab = data[3]
    siglip = ContrastiveModel(encoder_preset("tiny").for_vocabulary(vocab))
    assert siglip.log_temperature.item() == pytest.approx(math.log(10)) and siglip.bias.item() == -10
    infonce = ContrastiveModel(encoder_preset("tiny").with_overrides({"loss": "infonce"}).for_vocabulary(vocab))
    assert infonce.log_temperature.item() == pytest.approx(math.log(1 / 0.07)) and not infonce.bias.requires_grad
    # identical captions count as matches: the default positives come from equal token ids
    ids = tokenize_captions(vocab, ["a red circle.", "a blue square.", "a red circle."], 64)
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    positives = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert siglip(pixels, ids).item() == pytest.approx(siglip(pixels, ids, positives).item(), rel=1e-6)
    assert siglip(pixels, ids).item() != pytest.approx(siglip(pixels, ids, torch.eye(3, dtype=torch.bool)).item())


# -- towers -------------------------------------------------------------------------------------------------------

def test_position_embeddings_interpolate_to_other_resolutions():
    torch.manual_seed(0)
    encoder = VisionEncoder(encoder_preset("tiny").vision).eval()  # 32 px, patch 8: a 4x4 grid
    assert encoder.position_embeddings(4, 4) is encoder.position  # the native size uses the table as is
    native = encoder(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert native.patches.shape == (2, 16, encoder.width) and native.pooled.shape == (2, encoder.width)
    larger = encoder(torch.rand(2, 3, 48, 48) * 2 - 1)
    assert larger.patches.shape == (2, 36, encoder.width) == (2, encoder.num_patches(48), encoder.width)
    assert encoder(torch.rand(1, 3, 64, 40) * 2 - 1).patches.shape == (1, 8 * 5, encoder.width)
    table = encoder.position_embeddings(6, 6).reshape(6, 6, -1)
    corners = encoder.position.reshape(4, 4, -1)
    assert torch.isfinite(table).all() and not torch.equal(table[0, 0], corners[0, 0])  # resampled, not copied
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder(torch.zeros(1, 3, 4, 4))


def test_class_token_pooling():
    config = encoder_preset("tiny").with_overrides({"vision.pool": "cls"}).vision
    output = VisionEncoder(config)(torch.zeros(2, 3, 32, 32))
    assert output.patches.shape == (2, 16, 64) and output.pooled.shape == (2, 64)


def test_text_tower_ignores_padding(data):
    vocab = data[3]
    config = encoder_preset("tiny").for_vocabulary(vocab).text
    torch.manual_seed(0)
    tower = TextEncoder(config).eval()
    ids = tokenize_captions(vocab, ["a red circle. a small red circle at the top.", "a blue cross."], 64)
    padded = tokenize_captions(vocab, ["a red circle. a small red circle at the top.", "a blue cross."], 64, pad_to=40)
    assert padded.shape[1] == 40 and ids.shape[1] < 40
    torch.testing.assert_close(tower(ids), tower(padded), atol=1e-5, rtol=1e-5)


def test_tokenize_captions_brackets_pads_and_cuts(data):
    vocab = data[3]
    special = vocab.special
    ids = tokenize_captions(vocab, ["a red circle.", "two blue squares and a green cross. " * 10], 16)
    assert ids.shape == (2, 16)
    short = ids[0][ids[0] != special.pad].tolist()
    assert short == [special.bos, *vocab.encode_text("a red circle."), special.eos]
    assert ids[1, 0] == special.bos and ids[1, -1] == special.eos and (ids[1] != special.pad).all()


def test_batches_are_a_function_of_seed_and_step():
    first = [batch_indices(step, 7, 20, seed=3) for step in range(6)]
    assert all(np.array_equal(a, batch_indices(step, 7, 20, seed=3)) for step, a in enumerate(first))
    epoch = np.concatenate(first)[:20]  # the first 20 rows are one permutation of the pairs
    assert sorted(epoch.tolist()) == list(range(20))
    assert not np.array_equal(batch_indices(0, 7, 20, seed=4), first[0])


# -- training -----------------------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_writes_the_run(run):
    out, result = run
    lines = log_lines(out)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert {"step", "loss", "temperature", "bias", "lr", "grad_norm", "images_per_s"} <= set(lines[0])
    first, last = np.mean([r["loss"] for r in lines[:4]]), np.mean([r["loss"] for r in lines[-4:]])
    assert last < 0.8 * first, (first, last)
    assert (out / "latest").read_text().strip() == f"step_{STEPS:08d}"
    checkpoint = out / "checkpoints" / f"step_{STEPS:08d}"
    for name in ("model.safetensors", "config.json", "meta.json", "optimizer.safetensors", "optimizer.json",
                 "vocab/vocab.json"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == STEPS
    saved = json.loads((out / "zero_shot.json").read_text())
    assert saved["step"] == STEPS and saved["colour_shape"] == result["zero_shot"]["colour_shape"]


def test_load_encoder_reads_the_run_and_other_resolutions(run, data):
    out, _ = run
    model, config = load_encoder(out)
    assert not model.training and config.vision.image_size == 32 and config.text.vocab_size == data[3].image_offset
    pictures = load_pictures(sorted((data[1] / "images").glob("scene-*.png"))[:3], 48)  # 32 px files, resized
    assert pictures.shape == (3, 3, 48, 48) and pictures.min() >= -1 and pictures.max() <= 1
    embeddings = model.encode_image(pictures)
    assert embeddings.shape == (3, config.embed_dim)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    assert encoder_vocabulary(out).fingerprint == data[3].fingerprint


def test_resume_continues_exactly(run, tmp_path, data):
    out, _ = run
    _, world, vocab_dir, _ = data
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    (copy / "latest").write_text("step_00000008\n")  # as if the run had stopped after its step-8 checkpoint
    trainer = EncoderTrainer(tiny_config(), world, vocab_dir, copy)
    assert trainer.resume() and trainer.step == 8
    assert [line["step"] for line in log_lines(copy)] == list(range(1, 9))  # lines past the checkpoint dropped
    trainer.train()
    uninterrupted, resumed = log_lines(out), log_lines(copy)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(uninterrupted[8:], resumed[8:]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert b["temperature"] == a["temperature"] and b["bias"] == a["bias"]


def test_zero_shot_reports_accuracies_and_chance(run, data):
    out, result = run
    scores = result["zero_shot"]
    assert scores["pictures"] > 10
    for task, classes in (("colour_shape", len(COLOURS) * len(SHAPES)), ("shape", len(SHAPES)),
                          ("colour", len(COLOURS))):
        assert 0 <= scores[task]["accuracy"] <= 1
        assert scores[task]["classes"] == classes and scores[task]["chance"] == pytest.approx(1 / classes)
    retrieval = scores["retrieval"]
    assert 0 <= retrieval["recall_at_1"] <= 1 and 1 / retrieval["pictures"] <= retrieval["chance"] < 0.2
    model, _ = load_encoder(out)
    again = zero_shot(model, data[3], data[1], "heldout")
    assert again["colour_shape"] == scores["colour_shape"]  # the loaded checkpoint is the trained model


# -- bad inputs ---------------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(run, data, tmp_path, random_codes_tokenizer):
    out, _ = run
    root, world, vocab_dir, vocab = data
    with pytest.raises(FileNotFoundError, match="no-such-world.*world.json"):
        EncoderTrainer(tiny_config(), tmp_path / "no-such-world", vocab_dir, tmp_path / "r")
    with pytest.raises(ValueError, match="unknown config field 'vision.widht'"):
        tiny_config(**{"vision.widht": 8})
    with pytest.raises(ValueError, match="vision.pool"):
        tiny_config(**{"vision.pool": "max"}).validate()
    other = build_vocabulary(tmp_path / "other_vocab", world_texts(world, split="train"), 350, 64, random_codes_tokenizer)
    resumed = tmp_path / "other"
    shutil.copytree(out, resumed)
    with pytest.raises(ValueError, match="vocabulary"):
        EncoderTrainer(tiny_config(), world, tmp_path / "other_vocab", resumed).resume()
    model, _ = load_encoder(out)
    with pytest.raises(ValueError, match="vocabulary"):
        zero_shot(model, other, world)
    checkpoint = tmp_path / "edited"
    shutil.copytree(out / "checkpoints" / f"step_{STEPS:08d}", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["text"]["vocab_size"] = other.image_offset
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="text.vocab_size"):
        load_encoder(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="edited"):
        load_encoder(checkpoint)
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "broken.png", "text": "a red circle."}) + "\n")
    with pytest.raises(ValueError, match="broken.png"):
        EncoderTrainer(tiny_config(), world, vocab_dir, tmp_path / "r", pairs=pairs)
    assert isinstance(Vocabulary.load(vocab_dir), Vocabulary)


# -- the command --------------------------------------------------------------------------------------------------

def test_cli_trains_evaluates_and_exits_2_on_bad_arguments(data, tmp_path, capsys):
    _, world, vocab_dir, _ = data
    out = tmp_path / "cli_run"
    common = ["encoder", "train", "--world", str(world), "--vocab", str(vocab_dir), "--out", str(out),
              "--preset", "tiny"]
    assert cli.main(common + ["--steps", "2", "--loss", "infonce", "--set", "train.batch_size=16"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 2 and "colour_shape" in final["final"]["zero_shot"]
    assert json.loads((out / "config.json").read_text())["loss"] == "infonce"
    assert cli.main(["encoder", "eval", "--encoder", str(out), "--world", str(world)]) == 0
    scores = json.loads(capsys.readouterr().out.strip())
    assert scores["split"] == "heldout" and scores["colour_shape"]["classes"] == 24
    assert cli.main(common + ["--steps", "2"]) == 2  # a run is there: --resume or --restart
    assert "--resume" in capsys.readouterr().err
    assert cli.main(common + ["--set", "train.stepz=3", "--restart"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert cli.main(["encoder", "train", "--world", str(tmp_path / "missing"), "--vocab", str(vocab_dir),
                     "--out", str(tmp_path / "x"), "--preset", "tiny"]) == 2
    assert "world.json" in capsys.readouterr().err
    assert cli.main(["encoder", "eval", "--encoder", str(tmp_path / "missing"), "--world", str(world)]) == 2
