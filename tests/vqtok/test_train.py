"""Preset shapes, training lowers the loss, exact resume, the GAN path, config validation."""
from __future__ import annotations

import json

import pytest
import torch

from runkit.checkpoints import resolve_checkpoint
from vqtok.checkpoint import load_tokenizer
from vqtok.config import load_config, preset
from vqtok.data import StepBatchSampler, resolve_image_paths
from vqtok.model import VQModel
from vqtok.train import Trainer


def test_chameleon_preset_maps_512_to_32x32_codes():
    config = preset("chameleon")
    assert config.model.channel_multipliers == (1, 1, 2, 2, 4) and config.model.base_channels == 128
    assert config.quantizer.codebook_size == 8192 and config.quantizer.embed_dim == 256
    model = VQModel(config).eval()
    indices = model.encode(torch.rand(1, 3, 512, 512) * 2 - 1)
    assert indices.shape == (1, 32, 32)
    assert 0 <= int(indices.min()) and int(indices.max()) < 8192


@pytest.mark.parametrize("name", ["small", "tiny"])
def test_small_presets_round_trip_shapes(name):
    config = preset(name)
    model = VQModel(config).eval()
    size = config.model.resolution
    indices = model.encode(torch.rand(2, 3, size, size) * 2 - 1)
    assert indices.shape == (2, config.model.grid_size, config.model.grid_size)
    assert model.decode(indices).shape == (2, 3, size, size)
    with pytest.raises(ValueError, match="multiple of the downsample factor"):
        model.encode(torch.rand(1, 3, size + 1, size))


def test_config_overrides_reject_unknown_keys(tmp_path):
    config = preset("tiny").with_overrides({"train.lr": 0.5, "quantizer": {"codebook_size": 32}})
    assert config.train.lr == 0.5 and config.quantizer.codebook_size == 32
    with pytest.raises(ValueError, match="unknown config field 'train.learning_rate'"):
        preset("tiny").with_overrides({"train.learning_rate": 1})
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "tiny", "model": {"resolution": 33}}))
    with pytest.raises(ValueError, match="model.resolution=33"):
        load_config(str(path))
    with pytest.raises(ValueError, match="neither a preset"):
        load_config("missing-preset")
    round_trip = type(config).from_dict(json.loads(config.to_json()))
    assert round_trip == config


def test_step_batches_are_a_function_of_step_and_split_across_ranks():
    whole = StepBatchSampler(10, global_batch=4, steps=6, seed=3)
    resumed = StepBatchSampler(10, global_batch=4, steps=6, seed=3, start_step=4)
    assert list(resumed) == list(whole)[4:]
    rank0 = StepBatchSampler(10, 4, 6, 3, rank=0, world_size=2)
    rank1 = StepBatchSampler(10, 4, 6, 3, rank=1, world_size=2)
    for step in range(6):
        assert rank0.batch(step) + rank1.batch(step) == whole.batch(step)
    first_epoch = [index for step in range(2) for index, _ in whole.batch(step)] + [i for i, _ in whole.batch(2)[:2]]
    assert sorted(first_epoch) == list(range(10))  # every image once per epoch


def _config(steps, **overrides):
    return preset("tiny").with_overrides({"train.steps": steps, "train.checkpoint_every": 4, "train.sample_every": 100,
                                          "train.log_every": 1, **overrides})


def _losses(run):
    return {row["step"]: row["loss"] for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def test_training_lowers_the_loss(tmp_path, image_folder):
    paths = resolve_image_paths(image_folder)
    Trainer(_config(40, **{"train.log_every": 5}), tmp_path, paths, paths[:2]).train()
    losses = _losses(tmp_path)
    first, last = losses[5], min(losses[35], losses[40])
    assert last < 0.8 * first, losses


def test_resume_gives_identical_next_steps(tmp_path, image_folder):
    paths = resolve_image_paths(image_folder)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = _config(8, **{"quantizer.kmeans_init": True})  # k-means + revival: RNG state must round-trip too
    Trainer(config, straight, paths, []).train()
    Trainer(config, resumed, paths, []).train(steps=4)  # stop after the step-4 checkpoint
    trainer = Trainer(config, resumed, paths, [])
    assert trainer.resume() and trainer.step == 4
    trainer.train()
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == list(range(1, 9))  # no step logged twice
    for step in range(5, 9):
        assert b[step] == a[step], (step, a[step], b[step])
    model_a, _ = load_tokenizer(straight)
    model_b, _ = load_tokenizer(resumed)
    for (name, tensor_a), tensor_b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(tensor_a, tensor_b), name


def test_resume_refuses_a_different_model(tmp_path, image_folder):
    paths = resolve_image_paths(image_folder)
    Trainer(_config(4), tmp_path, paths, []).train()
    other = _config(4, **{"quantizer.codebook_size": 32})
    with pytest.raises(ValueError, match="config differs"):
        Trainer(other, tmp_path, paths, []).resume()


def test_adversarial_path_trains_discriminator_and_checkpoints_it(tmp_path, image_folder):
    paths = resolve_image_paths(image_folder)
    config = _config(4, **{"loss.adversarial_weight": 0.5, "loss.adversarial_start": 2, "loss.discriminator_channels": 8})
    trainer = Trainer(config, tmp_path, paths, [])
    disc_before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "loss_discriminator" not in rows[0] and "loss_discriminator" in rows[-1]  # delayed start
    assert rows[-1]["adaptive_weight"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, trainer.discriminator.parameters()))
    again = Trainer(config, tmp_path, paths, [])
    assert again.resume()
    for a, b in zip(trainer.discriminator.state_dict().values(), again.discriminator.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a vqtok run directory"):
        resolve_checkpoint(tmp_path / "empty")


def test_checkpoint_writes_are_atomic(tiny_run):
    directory = resolve_checkpoint(tiny_run)
    assert directory.name == "step_00000008"
    assert not list(tiny_run.glob("checkpoints/*.tmp"))
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["tokenizer"]["codebook_size"] == 64 and len(meta["tokenizer"]["weights_sha256"]) == 64
    assert (tiny_run / "samples" / "step_00000008.png").is_file()


def test_training_with_lpips_uses_the_perceptual_term(tmp_path, image_folder):
    from vqtok.losses import build_lpips

    paths = resolve_image_paths(image_folder)
    config = _config(2, **{"loss.perceptual_weight": 1.0})
    Trainer(config, tmp_path, paths, [], lpips_model=build_lpips("alex", allow_random_trunk=True)).train()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(row["loss_perceptual"] > 0 for row in rows)
    assert rows[-1]["loss"] > rows[-1]["loss_reconstruction"] + rows[-1]["loss_perceptual"] * 0.99


def test_crops_are_reproducible_and_channel_permutation_moves_colours(tmp_path):
    import numpy as np
    from PIL import Image

    from vqtok.data import CropDataset

    red = np.zeros((80, 120, 3), dtype=np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    plain = CropDataset([tmp_path / "red.png"], resolution=32, crop_size=32)
    permuted = CropDataset([tmp_path / "red.png"], resolution=32, crop_size=32, permute_channels=True)
    assert torch.equal(permuted[(0, 7)], permuted[(0, 7)])  # same (index, seed) -> same crop
    assert plain[(0, 3)].shape == (3, 32, 32)
    bright_channels = {int(permuted[(0, seed)].mean(dim=(1, 2)).argmax()) for seed in range(30)}
    assert bright_channels == {0, 1, 2}
    assert {int(plain[(0, seed)].mean(dim=(1, 2)).argmax()) for seed in range(10)} == {0}


# ----------------------------------------------------------------- several training sources (--data DIR[@RES])
def _solid_images(folder, count, colour, size=(16, 16)):
    """`count` PNGs of one solid colour: a crop's colour tells which source it came from."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.full((*size, 3), colour, dtype=np.uint8)).save(folder / f"{index:03d}.png")
    return folder


def test_data_specs_parse_and_bad_ones_are_named(tmp_path):
    from vqtok.data import ImageSource, check_crop_fits, parse_data_spec, resolve_sources

    assert parse_data_spec("photos/") == ("photos/", None)
    assert parse_data_spec("world/images@64") == ("world/images", 64)
    assert parse_data_spec("me@home/pics") == ("me@home/pics", None)  # only a trailing @<digits> is a resolution
    assert parse_data_spec("a@b@48") == ("a@b", 48)
    with pytest.raises(ValueError, match=r"'@64': missing DIR"):
        parse_data_spec("@64")
    with pytest.raises(ValueError, match=r"'pics@0': .*positive"):
        parse_data_spec("pics@0")
    with pytest.raises(ValueError, match="empty path"):
        parse_data_spec("")

    at_folder = _solid_images(tmp_path / "shots@home", 2, (255, 0, 0))
    plain = _solid_images(tmp_path / "plain", 3, (0, 0, 255))
    sources = resolve_sources([str(at_folder), f"{plain}@32"])
    assert [s.describe() for s in sources] == [{"path": str(at_folder), "resolution": None, "images": 2},
                                               {"path": str(plain), "resolution": 32, "images": 3}]
    with pytest.raises(FileNotFoundError, match=r"plain@abc'.*no such file.*'@' followed by digits"):
        resolve_sources([f"{plain}@abc"])
    with pytest.raises(FileNotFoundError, match="nope.*no such file"):
        resolve_sources([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty@32'.*no image files"):
        resolve_sources([f"{tmp_path / 'empty'}@32"])
    with pytest.raises(ValueError, match=r"plain@32: train.crop_size=64.*--set train.crop_size=N with N <= 32"):
        check_crop_fits(sources, 64)
    check_crop_fits(sources, 32)
    assert resolve_sources(None)[0].resolution is None  # no --data: the embedded photos at the config's scale
    assert isinstance(sources[0], ImageSource)


def test_sources_get_balanced_shares_whatever_their_size(tmp_path):
    from vqtok.data import CropDataset, resolve_sources

    sources = resolve_sources([f"{_solid_images(tmp_path / 'few', 3, (255, 0, 0))}@16",
                               f"{_solid_images(tmp_path / 'many', 60, (0, 0, 255))}@16"])
    dataset = CropDataset(sources, resolution=32, crop_size=16)
    assert dataset.source_sizes == [3, 60] and len(dataset) == 63
    sampler = StepBatchSampler(dataset.source_sizes, global_batch=8, steps=50, seed=1)
    items = [item for batch in sampler for item in batch]
    red = sum(int(dataset[item][0].mean() > 0) for item in items)  # crops of the 3-file source are red
    assert len(items) == 400 and 0.35 <= red / 400 <= 0.65, red
    assert {index for index, _ in items[:120]} == set(range(63))  # each source walks its own permutation
    resumed = StepBatchSampler(dataset.source_sizes, 8, 50, 1, start_step=20)
    assert list(resumed) == list(sampler)[20:]
    halves = [StepBatchSampler(dataset.source_sizes, 8, 50, 1, rank=r, world_size=2) for r in (0, 1)]
    assert all(halves[0].batch(s) + halves[1].batch(s) == sampler.batch(s) for s in range(50))
    assert {dataset.interleaved_index(i) < 3 for i in range(4)} == {True, False}  # k-means init sees both


def test_native_resolution_source_yields_the_whole_picture(tmp_path):
    import numpy as np
    from PIL import Image

    from vqtok.data import CropDataset, ImageSource

    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "pic.png")
    expected = {picture.tobytes(), picture[:, ::-1].tobytes()}
    native = CropDataset([ImageSource("pics", (tmp_path / "pic.png",), 64)], resolution=256, crop_size=64)
    seen = set()
    for seed in range(12):
        crop = ((native[(0, seed)] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert crop.tobytes() in expected, seed  # exactly the picture (maybe flipped): no resampling
        seen.add(crop.tobytes())
    assert seen == expected
    jittered = CropDataset([tmp_path / "pic.png"], resolution=256, crop_size=64)  # no @RES: enlarged >= 4x
    crop = ((jittered[(0, 0)] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert crop.tobytes() not in expected
    # A bad file is replaced by an image of its own source, so the replacement keeps that source's scale.
    (tmp_path / "bad.png").write_bytes(b"not a png")
    mixed = CropDataset([ImageSource("a", (tmp_path / "pic.png",), None),
                         ImageSource("b", (tmp_path / "bad.png", tmp_path / "pic.png"), 64)], resolution=256, crop_size=64)
    crop = ((mixed[(1, 0)] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert crop.tobytes() in expected and mixed.bad == {1}


def test_one_source_draws_the_same_batches_and_crops_as_before(image_folder):
    import numpy as np

    from vqtok.data import CropDataset, ImageSource

    sampler = StepBatchSampler(7, global_batch=6, steps=9, seed=5, start_step=2, rank=1, world_size=2)
    for step in range(2, 9):  # the historical formula: permutation per epoch seeded [seed, epoch]
        positions = [step * 6 + slot for slot in range(3, 6)]
        assert [index for index, _ in sampler.batch(step)] == [
            int(np.random.default_rng([5, p // 7]).permutation(7)[p % 7]) for p in positions]
    assert list(StepBatchSampler([7], 6, 9, 5, 2, 1, 2)) == list(sampler)
    paths = resolve_image_paths(image_folder)
    as_paths = CropDataset(paths, resolution=32, crop_size=32)
    as_source = CropDataset([ImageSource("x", tuple(paths))], resolution=32, crop_size=32)
    for item in [(0, 1), (5, 2), (11, 3)]:
        assert torch.equal(as_paths[item], as_source[item])


def test_cli_trains_on_two_sources_and_records_them(tmp_path, image_folder, capsys):
    from vqtok.cli import main

    pictures = _solid_images(tmp_path / "pictures", 5, (0, 200, 0), size=(32, 32))
    run = tmp_path / "run"
    code = main(["train", "--config", "tiny", "--data", str(image_folder), "--data", f"{pictures}@32", "--steps", "2",
                 "--out", str(run)])
    assert code == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 2
    meta = json.loads((resolve_checkpoint(run) / "meta.json").read_text())
    assert meta["train_data"] == [{"path": str(image_folder), "resolution": None, "images": 12},
                                  {"path": str(pictures), "resolution": 32, "images": 5}]
    code = main(["train", "--config", "tiny", "--data", f"{pictures}@16", "--steps", "2", "--out", str(tmp_path / "r2")])
    assert code == 2 and "--set train.crop_size=N" in capsys.readouterr().err
