"""Train the unified text+image transformer with DeepSpeed.

    deepspeed scripts/train_unified.py --data runs/packed --out runs/lm --deepspeed_config configs/deepspeed/zero2.json
    deepspeed --num_gpus 8 scripts/train_unified.py --model 350m --data ... --deepspeed_config configs/deepspeed/zero3.json
    deepspeed --hostfile hosts scripts/train_unified.py ...          # multi-node (see README)
    python scripts/train_unified.py --model tiny --data ... --out ...  # single process, no launcher (CPU or GPU)

--resume continues from RUN/latest exactly (same data position, same next loss), from the run's own resume state
(safetensors + JSON: nothing is unpickled); when the checkpoint `latest` names is incomplete or damaged, from the
newest complete one, saying so. --resume-trust-deepspeed resumes from DeepSpeed's pickled checkpoint instead
(unpickling can run code: only for runs you wrote yourself, and refused unless you own the files). The model
section of the config must match the run's. Exit status: 0 done, 2 bad arguments/config/data/checkpoint (one
line naming the file or field), 3 the loss diverged.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from runkit.commands import failed
from runkit.distributed import teardown_distributed
from runkit.files import atomic_write_text, read_json
from runkit.runs import RunDirectory
from runkit.typed_config import changed_fields, parse_overrides
from unified_lm.data.packing import PackedDataset
from unified_lm.model.config import UnifiedConfig, load_config
from unified_lm.tokens.vocab import Vocabulary

BAD_INPUT = (ValueError, OSError, KeyError, MemoryError, RuntimeError)  # one line, exit 2 (see runkit.commands.error_line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="packed dataset directory (from `unified-lm prepare`)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--model", default="small", help="preset (tiny, small, 350m, 7b) or JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.lr=3e-4 or model.norm_reordering=true")
    parser.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/latest (the run's own resume state)")
    parser.add_argument("--resume-trust-deepspeed", action="store_true",
                        help="continue from DeepSpeed's own pickled checkpoint instead (unpickling runs code: only "
                        "runs you wrote; refused unless you own the files); implies --resume")
    parser.add_argument("--restart", action="store_true", help="delete RUN's checkpoints and log, start at step 0")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--deepspeed_config", help="DeepSpeed JSON config (configs/deepspeed/zero{1,2,3}.json)")
    parser.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed-launcher compatibility")
    args = parser.parse_args(argv)
    args.resume = args.resume or args.resume_trust_deepspeed
    return args


def fill_picture_encoder(config: UnifiedConfig) -> None:
    """The continuous path's architecture: the image encoder of train.encoder_run, else the picture section of
    train.init_from's config (a stage-1 run), so the model can be rebuilt from its checkpoint alone."""
    picture = config.model.picture
    if config.train.encoder_run:
        from unified_lm.vision.contrastive import read_encoder_config, resolve_encoder

        vision = asdict(read_encoder_config(resolve_encoder(config.train.encoder_run)).vision)
        if picture.encoder and picture.encoder != vision:
            raise ValueError(f"model.picture.encoder {picture.encoder} differs from train.encoder_run's {vision}")
        picture.encoder = vision
    elif config.train.init_from and not picture.encoder:
        from unified_lm.model.checkpoint import resolve_run

        source = resolve_run(config.train.init_from) / "config.json"
        initial = UnifiedConfig.from_dict(read_json(source)).model.picture
        if initial.encoder:
            config.model.picture = initial


def build_config(args: argparse.Namespace, dataset: PackedDataset, out: Path) -> UnifiedConfig:
    overrides = parse_overrides(args.set)
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    config = load_config(args.model).with_overrides(overrides)
    vocab_size = dataset.vocab.size
    if config.model.vocab_size not in (0, vocab_size):
        raise ValueError(f"model.vocab_size {config.model.vocab_size} does not match the dataset's vocabulary "
                         f"({vocab_size} ids: {dataset.vocab.text_size} text + 6 special + {dataset.vocab.codebook_size} image)")
    config.model.vocab_size = vocab_size
    fill_picture_encoder(config)
    if config.train.seq_len != dataset.seq_len:
        print(f"[train] train.seq_len {config.train.seq_len} -> {dataset.seq_len} (the dataset's rows)", flush=True)
        config.train.seq_len = dataset.seq_len
    config.validate()
    run_vocab = out / "vocab" / "vocab.json"
    if args.resume and run_vocab.is_file():
        fingerprint = Vocabulary.load(run_vocab.parent).fingerprint
        if fingerprint != dataset.vocab.fingerprint:
            raise ValueError(f"--resume: {args.data} uses vocabulary {dataset.vocab.fingerprint}, but the run in {out} "
                             f"was trained on vocabulary {fingerprint}; the ids would mean different tokens")
    saved = out / "config.json"
    if args.resume and saved.is_file():
        previous = UnifiedConfig.from_dict(read_json(saved))
        if previous.model != config.model:
            changed = changed_fields(asdict(previous.model), asdict(config.model))
            raise ValueError(f"--resume: the model config differs from the run's {saved} in {changed}")
    return config


def main(argv: list[str] | None = None) -> int:
    """`deepspeed scripts/train_unified.py ARGS` (the script only calls this): 0 done, 2 bad input, 3 diverged."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from unified_lm.train.trainer import Trainer, ensure_launch_env

    out = Path(args.out)
    try:
        dataset = PackedDataset(args.data)
        config = build_config(args, dataset, out)
        RunDirectory(out).refuse_to_overwrite(args.resume, args.restart)
    except BAD_INPUT as err:
        return failed(err)
    ensure_launch_env()
    rank = int(os.environ["RANK"])
    if args.restart and rank == 0:
        RunDirectory(out).restart(files=("loss.png",))
    try:
        out.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(config, dataset, out, args.deepspeed_config, args.device)
    except BAD_INPUT as err:
        return failed(err)
    try:
        return resume_and_train(trainer, args, rank)
    finally:
        teardown_distributed()


def resume_and_train(trainer, args: argparse.Namespace, rank: int) -> int:
    """Resume (with --resume), record the run's config and vocabulary, train to train.steps."""
    from unified_lm.train.trainer import TrainingDiverged

    config, dataset, out = trainer.config, trainer.dataset, trainer.out
    try:
        try:
            if args.resume and trainer.resume(trust_deepspeed=args.resume_trust_deepspeed):
                source = "DeepSpeed's checkpoint" if args.resume_trust_deepspeed else "its resume state"
                print(f"[train] resumed {out} at step {trainer.step} from {trainer.resumed_from.name} ({source})",
                      flush=True)
        except BAD_INPUT as err:
            return failed(err)
        if rank == 0:
            atomic_write_text(out / "config.json", config.to_json())
            dataset.vocab.save(out / "vocab")
            print(f"[train] {trainer.num_parameters / 1e6:.2f}M parameters "
                  f"({trainer.trainable_parameters / 1e6:.2f}M trainable), vocabulary {dataset.vocab.size}, "
                  f"{len(dataset)} rows of {dataset.seq_len} tokens, world size {trainer.world_size}, "
                  f"ZeRO stage {trainer.zero_stage}, {trainer.tokens_per_step} tokens/step", flush=True)
        if trainer.step >= config.train.steps:
            print(f"[train] {out} already trained for {trainer.step} steps", flush=True)
            return 0
        final = trainer.train()
        if rank == 0:
            print(json.dumps({"final": final}), flush=True)
        return 0
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr, flush=True)
        return 3
    except (ValueError, OSError, KeyError, MemoryError) as err:  # a damaged dataset row, a full disk, ...
        return failed(err)


if __name__ == "__main__":
    sys.exit(main())
