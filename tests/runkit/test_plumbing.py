"""runkit's run plumbing, shared by the three trainers: lr schedules against hand values, log truncation with a torn
last line, `latest` in both formats, checkpoint commit / resume choice, --restart, batch walks, decay groups and
typed configs."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from runkit.batches import epoch_permutation, walk_rows
from runkit.checkpoints import choose_checkpoint, commit_checkpoint, resume_checkpoint, staging_dir
from runkit.optim import decay_groups, weight_ids
from runkit.runs import RunDirectory, append_log, latest_text, read_latest, truncate_log, write_latest
from runkit.schedules import Schedule
from runkit.typed_config import TypedConfig, changed_fields

# -- lr schedules ------------------------------------------------------------------------------------------------


def test_warmup_then_cosine_by_hand():
    schedule = Schedule(warmup_steps=4, total_steps=12, min_ratio=0.1)
    # warm-up: (step + 1) / 4 of the peak; steps are 0-based, so step 3 reaches the peak
    assert [schedule.lr(s, 2.0) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert schedule.lr(4, 2.0) == 2.0  # progress 0: cos(0) = 1
    assert schedule.lr(6, 2.0) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert schedule.lr(8, 2.0) == pytest.approx(1.1)  # halfway: 2 * (0.1 + 0.9 * 0.5)
    assert schedule.lr(12, 2.0) == pytest.approx(0.2) and schedule.lr(1000, 2.0) == pytest.approx(0.2)  # floor
    assert schedule.factor(8) == pytest.approx(0.55)


def test_chameleon_and_constant_shapes_by_hand():
    chameleon = Schedule(warmup_steps=0, total_steps=10, min_ratio=0.01, shape="chameleon")
    assert chameleon.factor(0) == 1.0
    assert chameleon.factor(5) == pytest.approx(0.1)  # exponential: the geometric midpoint of 1 and 0.01
    assert chameleon.factor(10) == pytest.approx(0.01) and chameleon.factor(50) == pytest.approx(0.01)
    constant = Schedule(warmup_steps=2, total_steps=10, min_ratio=0.01, shape="constant")
    assert [constant.factor(s) for s in (0, 1, 2, 9, 20)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        Schedule(0, 10, 0.1, "linear")


def test_schedule_of_a_training_config():
    @dataclass
    class Train:
        lr: float = 1e-3
        warmup_steps: int = 2
        steps: int = 6
        min_lr_ratio: float = 0.5

    assert Schedule.of(Train()) == Schedule(2, 6, 0.5, "cosine")  # no `schedule` field: cosine
    train = Train()
    train.schedule = "constant"
    assert Schedule.of(train).shape == "constant"
    # warm-up without any step to decay over, and no warm-up at all: no division by zero
    assert Schedule(0, 0, 0.5).lr(0, 1.0) == 1.0 and Schedule(0, 0, 0.5).lr(1, 1.0) == pytest.approx(0.5)
    assert Schedule(3, 2, 0.5).factor(2) == 1.0


def test_trainers_share_the_schedule():
    from unified_lm.model.config import preset as lm_preset
    from unified_lm.train.encoder import learning_rate as encoder_lr
    from unified_lm.train.trainer import learning_rate_factor
    from unified_lm.vision.contrastive import PRESETS as ENCODER_PRESETS
    from vqtok.config import preset as vq_preset
    from vqtok.train import learning_rate as vq_lr

    vq = vq_preset("small").with_overrides({"train.steps": 100, "train.warmup_steps": 10})
    assert vq_lr(vq, 4) == vq.train.lr * 5 / 10 and vq_lr(vq, 100) == pytest.approx(vq.train.lr * vq.train.min_lr_ratio)
    encoder = ENCODER_PRESETS["tiny"]()
    assert encoder_lr(encoder, encoder.train.warmup_steps - 1) == encoder.train.lr
    lm = lm_preset("tiny").with_overrides({"train.schedule": "chameleon", "train.warmup_steps": 0, "train.steps": 11})
    assert learning_rate_factor(11, lm) == pytest.approx(lm.train.min_lr_ratio)  # progress 1 after the last step


# -- the log -----------------------------------------------------------------------------------------------------


def _rows(*steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_truncate_log_drops_later_rows_and_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(_rows(1, 2, 3, 4, 5) + '{"step": 6, "lo')  # the crash tore the row of step 6
    truncate_log(log, 4)
    assert log.read_text() == _rows(1, 2, 3, 4)  # kept rows byte for byte, the torn line gone
    # a torn last line is dropped even when it would parse and its step is not after the checkpoint
    log.write_text(_rows(1, 2) + json.dumps({"step": 2}))
    truncate_log(log, 10)
    assert log.read_text() == _rows(1, 2)
    # complete lines that are not rows (blank, not JSON, no step) go too; nothing raises
    log.write_text(_rows(1) + "\n" + "not json\n" + '{"loss": 3}\n' + "[1, 2]\n" + _rows(2, 3))
    truncate_log(log, 2)
    assert log.read_text() == _rows(1, 2)
    truncate_log(tmp_path / "missing.jsonl", 3)  # no log yet: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_append_log_writes_one_line_per_record(tmp_path):
    run = RunDirectory(tmp_path)
    run.append_log({"step": 1, "loss": 0.5})
    append_log(run.log, {"step": 2, "zero_shot": {"accuracy": 1.0}})
    assert [json.loads(line)["step"] for line in run.log.read_text().splitlines()] == [1, 2]
    run.truncate_log(1)
    assert run.log.read_text() == json.dumps({"step": 1, "loss": 0.5}) + "\n"


# -- latest and checkpoints --------------------------------------------------------------------------------------


def _checkpoint(run: RunDirectory, step: int, keep: int = 5, **kwargs):
    tmp = staging_dir(run.root, step)
    (tmp / "model.safetensors").write_bytes(b"weights %d" % step)
    return commit_checkpoint(tmp, keep, ("model.safetensors",), **kwargs)


def test_latest_in_both_formats(tmp_path):
    write_latest(tmp_path, "step_00000300")
    assert (tmp_path / "latest").read_text() == "step_00000300\n"
    assert read_latest(tmp_path) == "step_00000300" and latest_text(tmp_path) == "step_00000300"
    write_latest(tmp_path, "step_00000400", under_checkpoints=True)  # vqtok's form
    assert (tmp_path / "latest").read_text() == "checkpoints/step_00000400\n"
    assert read_latest(tmp_path) == "step_00000400"
    for bad in ("../../elsewhere", "/etc/passwd", "checkpoints/step_1/../..", "step_x"):
        (tmp_path / "latest").write_text(bad + "\n")
        with pytest.raises(ValueError, match="not a checkpoint name"):
            read_latest(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint name"):
        write_latest(tmp_path, "../step_1")
    (tmp_path / "latest").unlink()
    assert read_latest(tmp_path) is None and latest_text(tmp_path) is None


@pytest.mark.parametrize("under_checkpoints", [False, True])
def test_commit_checkpoint_renames_points_latest_and_prunes(tmp_path, under_checkpoints):
    run = RunDirectory(tmp_path / "run")
    for step in (1, 2, 3):
        final = _checkpoint(run, step, keep=2, under_checkpoints=under_checkpoints)
    assert final == run.checkpoint(3) and (final / "files.json").is_file()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_00000002", "step_00000003"]
    assert read_latest(run.root) == "step_00000003"
    assert choose_checkpoint(run.root, ("model.safetensors",)) == (run.checkpoint(3), None)
    # the same step saved again (after a resume) replaces the old directory; no .tmp is left behind
    (run.checkpoint(3) / "stale").write_text("x")
    _checkpoint(run, 3, keep=2, under_checkpoints=under_checkpoints)
    assert not (run.checkpoint(3) / "stale").exists() and not list(run.checkpoints.glob("*.tmp"))
    # a checkpoint written in place (as DeepSpeed's ranks do) is committed without a rename
    in_place = run.checkpoint(4)
    in_place.mkdir()
    (in_place / "model.safetensors").write_bytes(b"w")
    assert commit_checkpoint(in_place, 2, ("model.safetensors",)) == in_place and read_latest(run.root) == "step_00000004"


def test_resume_checkpoint_falls_back_or_refuses(tmp_path):
    run = RunDirectory(tmp_path)
    warnings = []
    assert resume_checkpoint(tmp_path, ("model.safetensors",), warnings.append) is None  # nothing saved yet
    _checkpoint(run, 1)
    _checkpoint(run, 2)
    (run.checkpoint(2) / "model.safetensors").write_bytes(b"cut")  # damaged after files.json was written
    assert resume_checkpoint(tmp_path, ("model.safetensors",), warnings.append) == run.checkpoint(1)
    assert len(warnings) == 1 and "step_00000002, which cannot be used" in warnings[0]
    (run.checkpoint(1) / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"cannot resume .*no other complete checkpoint.*pass --restart"):
        resume_checkpoint(tmp_path, ("model.safetensors",), warnings.append)
    with pytest.raises(FileNotFoundError, match="^--resume of RUN: "):
        resume_checkpoint(tmp_path, ("model.safetensors",), warnings.append, lambda note: f"--resume of RUN: {note}")


def test_restart_and_refusing_to_overwrite(tmp_path):
    run = RunDirectory(tmp_path)
    run.refuse_to_overwrite(resume=False, restart=False)  # a new run
    _checkpoint(run, 1)
    run.append_log({"step": 1})
    for name in ("samples/a.png", "loss.png", "keep.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    with pytest.raises(ValueError, match="already holds an encoder checkpoint; pass --resume to continue or --restart"):
        run.refuse_to_overwrite(resume=False, restart=False, what="an encoder checkpoint")
    run.refuse_to_overwrite(resume=True, restart=False)
    run.refuse_to_overwrite(resume=False, restart=True)
    run.restart(files=("loss.png", "never_written.json"), folders=("samples",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# -- batches -----------------------------------------------------------------------------------------------------


def test_walk_rows_visits_every_row_once_per_epoch():
    count, seed = 7, 3
    rows = walk_rows(0, 3 * count, count, seed)
    assert rows.dtype == np.int64
    for epoch in range(3):
        chunk = rows[epoch * count : (epoch + 1) * count]
        assert sorted(chunk.tolist()) == list(range(count))
        assert np.array_equal(chunk, np.random.default_rng([seed, epoch]).permutation(count))
    assert np.array_equal(walk_rows(5, 6, count, seed), rows[5:11])  # across an epoch boundary, from any position
    assert not np.array_equal(walk_rows(0, count, count, seed + 1), rows[:count])
    order = epoch_permutation(count, (seed, 1))
    assert np.array_equal(order, rows[count : 2 * count]) and not order.flags.writeable


# -- parameter groups --------------------------------------------------------------------------------------------


def test_decay_groups_split_weights_from_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.Conv2d(4, 4, 1))
    decayed = weight_ids(model, (torch.nn.Linear, torch.nn.Embedding))
    assert decayed == {id(model[0].weight), id(model[1].weight)}
    params = list(model.parameters())
    model[2].bias.requires_grad_(False)
    trained = [p for p in params if p.requires_grad]
    decay, rest = decay_groups(trained, decayed, 0.1, lr=2.0)
    assert [id(p) for p in decay["params"]] == [id(model[0].weight), id(model[1].weight)]
    assert [id(p) for p in rest["params"]] == [id(model[1].bias), id(model[2].weight), id(model[3].weight),
                                               id(model[3].bias)]  # Conv2d is not among this rule's matrices
    assert list(decay) == ["params", "weight_decay", "lr"] and (decay["weight_decay"], rest["weight_decay"]) == (0.1, 0.0)
    assert decay_groups([], decayed, 0.1) == [{"params": [], "weight_decay": 0.1}, {"params": [], "weight_decay": 0.0}]


# -- typed configs -----------------------------------------------------------------------------------------------


@dataclass
class _Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class _Config(TypedConfig):
    CONFIG_NAME = "toy config"
    name: str = "toy"
    train: _Inner = field(default_factory=_Inner)
    alpha: int = 0  # after the others: sorted JSON lists it first


@dataclass
class _Sorted(_Config):
    JSON_SORT_KEYS = True


def test_typed_config_round_trip_overrides_and_errors():
    config = _Config().with_overrides({"train.lr": 3e-4, "name": "b"})
    assert config == _Config("b", _Inner(3e-4, 10)) and _Config.from_dict(config.to_dict()) == config
    assert list(json.loads(config.to_json())) == ["name", "train", "alpha"]  # the fields' order
    assert list(json.loads(_Sorted().to_json())) == ["alpha", "name", "train"]  # vqtok's config.json
    with pytest.raises(ValueError, match=r"toy config\.train\.steps: expected an integer"):
        _Config.from_dict({"train": {"steps": 1.5}})
    with pytest.raises(ValueError, match="unknown config field 'train.nope'"):
        _Config().with_overrides({"train.nope": 1})
    assert changed_fields(_Config().to_dict(), config.to_dict()) == ["name", "train.lr"]
