"""DeepSpeed training on CPU: 1 process without the launcher, 2 processes through `deepspeed` (ZeRO-2, ZeRO-3),
exact resume, divergence handling, bad configs; and no /dev/shm files left behind."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port

TRAIN = str(REPO / "scripts" / "train_unified.py")
ZERO = {stage: str(REPO / "configs" / "deepspeed" / f"zero{stage}.json") for stage in (1, 2, 3)}
COMMON = ["--model", "tiny", "--set", "train.log_every=1", "--set", "train.lr=3e-3", "--set", "train.warmup_steps=2"]


@pytest.fixture(autouse=True)
def no_shm_leftovers():
    before = set(glob.glob("/dev/shm/deepspeed_*"))
    yield
    assert set(glob.glob("/dev/shm/deepspeed_*")) - before == set(), "DeepSpeed left files in /dev/shm"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def train(data: Path, out: Path, *extra: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    args = ["--data", str(data), "--out", str(out), *COMMON, *extra]
    if processes == 1:
        command = [sys.executable, TRAIN, *args]
    else:
        launcher = str(Path(sys.executable).with_name("deepspeed"))
        command = [launcher, "--num_gpus", str(processes), "--master_port", str(free_port()), TRAIN, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def first_and_last(records: list[dict], count: int = 3) -> tuple[float, float]:
    losses = [r["loss"] for r in records]
    return sum(losses[:count]) / count, sum(losses[-count:]) / count


def resume_from(run: Path, copy: Path, step: int) -> None:
    shutil.copytree(run, copy)
    (copy / "latest").write_text(f"step_{step:08d}\n")


def craft_pickle(path: Path, marker: Path) -> None:
    """Replace a DeepSpeed checkpoint file by a pickle that creates `marker` when it is unpickled."""
    script = ("import os, sys, torch\n"
              "class Boom:\n"
              "    def __reduce__(self):\n"
              "        return (os.system, ('touch ' + sys.argv[2],))\n"
              "torch.save({'module': Boom()}, sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", script, str(path), str(marker)], check=True, env=_env())


@pytest.mark.slow
def test_one_process_with_accumulation_lowers_loss_and_resumes_exactly(lm_data, tmp_path):
    run = tmp_path / "run"
    accumulate = ["--set", "train.grad_accum_steps=2", "--set", "train.micro_batch_size=2"]
    result = train(lm_data.packed, run, "--steps", "8", "--set", "train.checkpoint_every=4",
                   "--deepspeed_config", ZERO[2], *accumulate)
    assert "ZeRO stage 2" in result.stdout and "world size 1" in result.stdout and "256 tokens/step" in result.stdout
    records = log(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    start, end = first_and_last(records)
    assert end < start - 0.2, f"loss did not fall: {start:.3f} -> {end:.3f}"
    first = records[0]
    assert len(first["max_qk_logit"]) == 2 and len(first["output_rms"]) == 2
    for key in ("text_loss", "image_loss", "z_loss", "log_z", "grad_norm", "tokens_per_s", "lr"):
        assert first[key] is not None and first[key] == first[key], key
    assert first["mfu"] is None  # no GPU: no MFU estimate
    assert (run / "loss.png").is_file() and (run / "latest").read_text().strip() == "step_00000008"
    # shareable weights: safetensors that load into a fresh model
    from safetensors.torch import load_file

    from unified_lm.model.config import UnifiedConfig
    from unified_lm.model.transformer import UnifiedTransformer

    config = UnifiedConfig.from_dict(json.loads((run / "checkpoints/step_00000008/config.json").read_text()))
    model = UnifiedTransformer(config.model)
    model.load_state_dict(load_file(run / "checkpoints/step_00000008/model.safetensors"))
    # an existing run is not silently overwritten
    refused = train(lm_data.packed, run, "--steps", "8", check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    # resume from step 4: steps 5..8 repeat the uninterrupted run's losses exactly. The copy's latest names a
    # missing checkpoint and step 8's resume state is truncated, so resume falls back to step 4 (and says so);
    # step 4's DeepSpeed pickle is replaced by one that runs code: the default resume never unpickles it.
    resumed = tmp_path / "resumed"
    resume_from(run, resumed, 9)
    state = resumed / "checkpoints/step_00000008/resume/rank00000.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    marker = tmp_path / "PWNED"
    craft_pickle(resumed / "checkpoints/step_00000004/mp_rank_00_model_states.pt", marker)
    result = train(lm_data.packed, resumed, "--steps", "8", "--resume", "--set", "train.checkpoint_every=4",
                   "--deepspeed_config", ZERO[2], *accumulate)
    assert "latest names step_00000009, which cannot be used: step_00000009 does not exist" in result.stdout
    assert "using step_00000004, the newest complete checkpoint" in result.stdout
    assert "resumed" in result.stdout and "at step 4" in result.stdout and "(its resume state)" in result.stdout
    assert not marker.exists(), "resume unpickled DeepSpeed's state"
    again = log(resumed)
    assert [r["step"] for r in again] == list(range(1, 9))  # lines after step 4 were replaced, not duplicated
    for a, b in zip(records[4:], again[4:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.is_dir()) == ["step_00000004", "step_00000008"]
    # the same from DeepSpeed's own (pickled) checkpoint, when asked for: exact too
    trusted = tmp_path / "trusted"
    resume_from(run, trusted, 4)
    result = train(lm_data.packed, trusted, "--steps", "8", "--resume-trust-deepspeed", "--set",
                   "train.checkpoint_every=4", "--deepspeed_config", ZERO[2], *accumulate)
    assert "at step 4" in result.stdout and "(DeepSpeed's checkpoint)" in result.stdout
    for a, b in zip(records[4:], log(trusted)[4:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    # a resume that would change the data order is refused, not silently misaligned
    changed = train(lm_data.packed, resumed, "--steps", "12", "--resume", "--deepspeed_config", ZERO[2],
                    "--set", "train.micro_batch_size=3", check=False)
    assert changed.returncode == 2 and "data order would differ" in changed.stderr, changed.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_deepspeed_launcher(lm_data, tmp_path, stage):
    run = tmp_path / f"zero{stage}"
    result = train(lm_data.packed, run, "--steps", "8", "--set", "train.checkpoint_every=4",
                   "--deepspeed_config", ZERO[stage], processes=2)
    assert f"ZeRO stage {stage}" in result.stdout and "world size 2" in result.stdout
    records = log(run)
    start, end = first_and_last(records)
    assert end < start - 0.2, f"loss did not fall: {start:.3f} -> {end:.3f}"
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints/step_00000008/model.safetensors")
    assert weights["embed.weight"].shape == (lm_data.vocab.size, 64)  # gathered whole, also under ZeRO-3
    if stage == 3:  # resume under ZeRO-3 with partitioned optimizer state, from each rank's own resume state
        resumed = tmp_path / "resumed"
        resume_from(run, resumed, 4)
        train(lm_data.packed, resumed, "--steps", "8", "--resume", "--set", "train.checkpoint_every=4",
              "--deepspeed_config", ZERO[stage], processes=2)
        assert sorted(p.name for p in (resumed / "checkpoints/step_00000008/resume").iterdir()) == [
            "rank00000.json", "rank00000.safetensors", "rank00001.json", "rank00001.safetensors"]
        for a, b in zip(records[4:], log(resumed)[4:]):
            assert a["loss"] == b["loss"], (a, b)


@pytest.mark.slow
def test_bf16_weights_train(lm_data, tmp_path):
    """The GPU precision path (DeepSpeed bf16: bf16 weights and activations, fp32 master weights) forced on CPU."""
    config = tmp_path / "bf16.json"
    config.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    run = tmp_path / "run"
    train(lm_data.packed, run, "--steps", "6", "--deepspeed_config", str(config))
    records = log(run)
    assert all(r["loss"] == r["loss"] and r["grad_norm"] is not None for r in records)
    start, end = first_and_last(records, 2)
    assert end < start, f"bf16 loss did not fall: {start:.3f} -> {end:.3f}"
    from safetensors.torch import load_file

    assert load_file(run / "checkpoints/step_00000006/model.safetensors")["embed.weight"].dtype == torch.bfloat16


DIVERGE = textwrap.dedent("""
    import sys, torch
    from unified_lm.model.config import preset
    from unified_lm.data.packing import PackedDataset
    from unified_lm.train.trainer import Trainer, TrainingDiverged, ensure_launch_env
    ensure_launch_env()
    data, out, ds_config = sys.argv[1:4]
    dataset = PackedDataset(data)
    config = preset("tiny").with_overrides({"train.steps": 6, "train.checkpoint_every": 2, "train.seq_len": 64})
    config.model.vocab_size = dataset.vocab.size
    trainer = Trainer(config, dataset, out, ds_config)
    for _ in range(2):
        trainer.train_step(collect_stats=False)
        trainer.step += 1
    trainer.save()
    with torch.no_grad():  # poison the weights: the next loss is NaN
        next(trainer.engine.module.parameters()).fill_(float("nan"))
    try:
        trainer.train()
    except TrainingDiverged as err:
        print("DIVERGED", err)
        sys.exit(0)
    sys.exit("no divergence detected")
""")


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(lm_data, tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(script), str(lm_data.packed), str(out), ZERO[1]],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "loss is not finite at step 3" in result.stdout and "checkpoints/step_00000002" in result.stdout
    assert (out / "latest").read_text().strip() == "step_00000002"
    assert not (out / "checkpoints" / "step_00000003").exists()
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints/step_00000002/model.safetensors").values())


EXACT_RESUME = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    from unified_lm.model.config import preset
    from unified_lm.data.packing import PackedDataset
    from unified_lm.train.trainer import Trainer, ensure_launch_env
    ensure_launch_env()
    data, work = PackedDataset(sys.argv[1]), Path(sys.argv[2])

    def trainer(out, stage, bf16):
        config = preset("tiny").with_overrides({"train.steps": 4, "train.seq_len": data.seq_len, "model.dropout": 0.1,
                                                "train.micro_batch_size": 2, "train.grad_accum_steps": 2})
        config.model.vocab_size = data.vocab.size
        ds = work / f"zero{stage}-{bf16}.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}))
        return Trainer(config, data, out, str(ds))

    def losses(t, steps):  # each step's summed loss (token-weighted), saving every 2 steps
        out = []
        for _ in range(steps):
            out.append(float(t.train_step(collect_stats=False).sums[0]))
            t.step += 1
            if t.step % 2 == 0:
                t.save()
        return out

    results = []
    for stage, bf16, trust in json.loads(sys.argv[3]):
        out = work / f"run-{stage}-{bf16}-{trust}"
        uninterrupted = losses(trainer(out, stage, bf16), 4)[2:]
        (out / "latest").write_text("step_00000002\\n")
        resumed = trainer(out, stage, bf16)
        assert resumed.resume(trust_deepspeed=trust) and resumed.step == 2
        results.append([stage, bf16, trust, uninterrupted, losses(resumed, 2)])
    print(json.dumps(results))
""")


@pytest.mark.slow
def test_exact_resume_under_every_zero_stage_from_either_state(lm_data, tmp_path):
    """Steps 3-4 after resuming at step 2 give bit-identical losses (dropout on) to the uninterrupted run, from the
    run's own resume state (ZeRO 0, 1, 3, and 2 under bf16) and from DeepSpeed's checkpoint (ZeRO 0, 1, 3);
    ZeRO-2 in fp32 is covered for both by test_one_process_with_accumulation_lowers_loss_and_resumes_exactly."""
    script = tmp_path / "exact_resume.py"
    script.write_text(EXACT_RESUME)
    cases = [[0, False, False], [1, False, False], [3, False, False], [2, True, False],
             [0, False, True], [1, False, True], [3, False, True]]
    result = subprocess.run([sys.executable, str(script), str(lm_data.packed), str(tmp_path), json.dumps(cases)],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, bf16, trust, uninterrupted, resumed in json.loads(result.stdout.strip().splitlines()[-1]):
        assert resumed == uninterrupted, (stage, bf16, trust, uninterrupted, resumed)


def test_trusting_deepspeed_needs_files_only_you_can_write(tmp_path):
    from unified_lm.train.resume import check_written_by_you

    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp_path / "mp_rank_00_model_states.pt").chmod(0o644)
    tmp_path.chmod(0o755)
    check_written_by_you(tmp_path)
    (tmp_path / "mp_rank_00_model_states.pt").chmod(0o664)
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt is writable by other users"):
        check_written_by_you(tmp_path)
    (tmp_path / "mp_rank_00_model_states.pt").chmod(0o644)
    (tmp_path / "link.pt").symlink_to(tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="symbolic link"):
        check_written_by_you(tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--set", "model.vocab_size=5"], "does not match the dataset's vocabulary"),
    (["--set", "model.nonsense=1"], "unknown config field 'model.nonsense'"),
    (["--model", "huge"], "neither a preset"),
])
def test_bad_arguments_exit_2(lm_data, tmp_path, extra, message):
    result = train(lm_data.packed, tmp_path / "run", *extra, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_bad_deepspeed_configs_are_refused(lm_data, tmp_path):
    from unified_lm.model.config import preset
    from unified_lm.train.trainer import resolve_deepspeed_config

    config = preset("tiny")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        resolve_deepspeed_config(str(path), config, 1, on_cuda=False)
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=99 disagrees"):
        resolve_deepspeed_config(str(path), config, 1, on_cuda=False)
    path.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match="fp16 is not supported"):
        resolve_deepspeed_config(str(path), config, 1, on_cuda=False)
    with pytest.raises(FileNotFoundError, match="DeepSpeed config not found"):
        resolve_deepspeed_config(str(tmp_path / "missing.json"), config, 1, on_cuda=False)
    resolved = resolve_deepspeed_config(ZERO[3], config, 2, on_cuda=False)
    assert resolved["train_batch_size"] == 2 * config.train.micro_batch_size and resolved["bf16"]["enabled"] is False
    assert resolve_deepspeed_config(ZERO[3], config, 2, on_cuda=True)["bf16"]["enabled"] is True


def test_learning_rate_schedules():
    from unified_lm.model.config import preset
    from unified_lm.train.trainer import learning_rate_factor

    config = preset("tiny").with_overrides({"train.steps": 100, "train.warmup_steps": 10, "train.min_lr_ratio": 0.1})
    factors = [learning_rate_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=0.01) and all(a >= b for a, b in zip(factors[9:], factors[10:]))
    config.train.schedule = "chameleon"
    assert learning_rate_factor(99, config) == pytest.approx(0.1, rel=0.05)
    assert learning_rate_factor(54, config) == pytest.approx(0.1**0.5, rel=0.05)  # exponential: geometric midpoint


def test_resume_with_another_vocabulary_is_refused(lm_data, tmp_path):
    from unified_lm.tokens.vocab import Vocabulary, train_text_model

    run = tmp_path / "run"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    other = Vocabulary(train_text_model((" ".join(words[i:] + words[:i]) for i in range(200)), 300), 64)
    other.save(run / "vocab")
    result = train(lm_data.packed, run, "--resume", check=False)
    assert result.returncode == 2 and "the ids would mean different tokens" in result.stderr, result.stderr


ZERO3_BUILD = textwrap.dedent("""
    import json, sys, torch
    import deepspeed
    from unified_lm.model.config import preset
    from unified_lm.model.transformer import UnifiedTransformer
    from unified_lm.train.trainer import ensure_launch_env, import_deepspeed, parameter_groups
    ensure_launch_env()
    import_deepspeed(on_cpu=True)
    deepspeed.init_distributed(dist_backend="gloo")
    config = preset("tiny").model
    config.vocab_size, config.n_layers = 300, 4
    torch.manual_seed(0)
    plain = UnifiedTransformer(config)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        partitioned = UnifiedTransformer(config)
    groups = lambda model: [len(g["params"]) for g in parameter_groups(model, 0.1)]
    with deepspeed.zero.GatheredParameters(list(partitioned.parameters())):
        o_std = float(partitioned.layers[0].attention.o_proj.weight.float().std())
        q_std = float(partitioned.layers[0].attention.q_proj.weight.float().std())
    print(json.dumps({"groups": [groups(plain), groups(partitioned)], "o_std": o_std, "q_std": q_std,
                      "flops": [plain.flops_per_token(64), partitioned.flops_per_token(64)]}))
""")


@pytest.mark.slow
def test_zero3_partitioned_build_matches_the_plain_model(tmp_path):
    """Under zero.Init parameters are 1-D shards: decay groups, depth-scaled init and FLOPs must not depend on it."""
    script = tmp_path / "zero3_build.py"
    script.write_text(ZERO3_BUILD)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["groups"][0] == facts["groups"][1] and facts["groups"][0][1] > 0  # norms (incl. QK-norm) not decayed
    assert facts["flops"][0] == facts["flops"][1] > 0
    assert abs(facts["q_std"] - 0.02) < 0.003 and abs(facts["o_std"] - 0.02 / 8**0.5) < 0.002  # 1/sqrt(2 L), L = 4


@pytest.mark.slow
def test_caption_dropout_trains_the_unconditional_context(lm_data, tmp_path):
    """With caption dropout, pictures are also targets after [<bos>, <boi>] alone: after a short run the loss of
    held-out pictures' codes in exactly that context (2-way CFG's unconditional one) falls well below uniform.
    The pictures' codes are drawn from 8 of the 64 codes, so there is something to learn."""
    import numpy as np
    from conftest import TEST_TOKENIZER

    from unified_lm.data.prepare import PrepareSettings, prepare
    from unified_lm.model.checkpoint import load_model
    from vqtok.token_store import ShardWriter, write_manifest

    images = sorted((lm_data.world / "images").iterdir())
    store = tmp_path / "tokens"
    writer = ShardWriter(store, TEST_TOKENIZER, 64)
    codes = np.random.default_rng(0).integers(0, 8, size=(len(images), 4, 4))
    writer.append([p.name for p in images], codes)
    writer.close()
    write_manifest(store, 1, {"source_root": str(lm_data.world / "images")})
    packed = tmp_path / "packed"
    info = prepare([str(lm_data.documents)], str(lm_data.vocab_dir), str(packed),
                   PrepareSettings(seq_len=64, split="train", rows_per_shard=16, caption_dropout=0.5,
                                   kinds=("text_to_image", "story")), stores=[str(store)])
    assert info["captions_dropped"] > 0
    run = tmp_path / "run"
    train(packed, run, "--steps", "30", "--set", "train.checkpoint_every=30", "--set", "train.lr=1e-2")
    loaded = load_model(run, "cpu")
    vocab, special = loaded.vocab, loaded.vocab.special
    held = [vocab.image_ids(c) for c in codes[-10:]]  # <boi> codes <eoi>
    tokens = torch.from_numpy(np.stack([np.concatenate([[special.bos], ids[:-1]]) for ids in held]))  # [<bos>, <boi>, codes]
    targets = torch.from_numpy(np.stack([ids[1:] for ids in held]))  # the 16 codes and <eoi>
    with torch.no_grad():
        logits = loaded.model(tokens, code_positions=vocab.code_positions(tokens)).logits[:, 1:-1].float()
    picture = torch.from_numpy(vocab.image_mask)
    nats = torch.nn.functional.cross_entropy(logits.masked_fill(~picture, float("-inf")).reshape(-1, vocab.size),
                                             targets[:, :-1].reshape(-1))
    assert nats < 0.8 * math.log(64), f"{float(nats):.2f} nats per code after [<bos>, <boi>]; uniform is {math.log(64):.2f}"
