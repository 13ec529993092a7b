"""DeepSpeed training of the unified transformer on a packed dataset (`deepspeed scripts/train_unified.py`).

DeepSpeed wraps the plain model from outside (ZeRO 1/2/3, bf16, gradient accumulation and clipping); the
optimizer is torch's AdamW (betas 0.9, 0.95) handed to `deepspeed.initialize`, so no DeepSpeed op is compiled.
On CPU the shared-memory all-reduce op is not built either (it compiles for a minute and leaves 66 MB files in
/dev/shm); gloo does the communication.

Run directory:

    RUN/config.json                     the full UnifiedConfig (vocab_size filled in)
    RUN/vocab/                          the vocabulary the ids belong to
    RUN/log.jsonl                       one line per log step (see `Trainer._log`)
    RUN/loss.png                        loss curves (total, text, image), redrawn at each checkpoint
    RUN/latest                          names the newest complete checkpoint
    RUN/checkpoints/step_00000300/
        model.safetensors config.json meta.json vocab/  weights to share and sample from (nothing pickled)
        resume/rank00000.{safetensors,json}   the run's own resume state, per rank (resume.py): what --resume reads
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's checkpoint (torch pickles): read only with
                                                     --resume-trust-deepspeed, and only from your own files
        files.json                          every file above with its size, written last (a complete checkpoint)

The batch of every step is a pure function of the step number (`packing.batch_indices`) and the dropout RNG is
re-seeded from (seed, step, rank), so `--resume` continues exactly: same data position, same next loss. A
checkpoint that `latest` names but that is incomplete or damaged is skipped, with a message, for the newest
complete one (runkit.checkpoints.choose_checkpoint); pruning deletes damaged checkpoints, never the good ones.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from runkit.checkpoints import checkpoint_dirs, checkpoint_problem, commit_checkpoint, resume_checkpoint
from runkit.distributed import free_port
from runkit.files import read_json
from runkit.optim import decay_groups, weight_ids
from runkit.runs import RunDirectory, latest_text
from runkit.schedules import Schedule
from unified_lm.data.packing import PackedDataset, batch_indices
from unified_lm.model.checkpoint import parse_grid, write_model_files
from unified_lm.model.config import UnifiedConfig
from unified_lm.model.transformer import ModelOutput, OutputHead, UnifiedTransformer
from unified_lm.train.engine import build_model, micro_batch_loss, parameter_count, wrap, zero_stage
from unified_lm.train.resume import check_storable, check_written_by_you, load_resume_state, save_resume_state

log = logging.getLogger("unified_lm")

RESUME_FILES = ("model.safetensors", "config.json", "resume/rank*.json", "resume/rank*.safetensors")  # --resume
DEEPSPEED_FILES = ("model.safetensors", "*model_states.pt", "*.pt")  # --resume-trust-deepspeed
# Dense bf16 tensor-core peak per GPU, FLOP/s, for the MFU estimate (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class TrainingDiverged(RuntimeError):
    pass


def ensure_launch_env() -> None:
    """Single-process runs without a launcher: give torch.distributed the env a launcher would set."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


def import_deepspeed(on_cpu: bool):
    """Import DeepSpeed; on CPU keep it from compiling its shared-memory communication op."""
    import deepspeed

    if on_cpu:
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def resolve_deepspeed_config(path: str | None, train: UnifiedConfig, world_size: int, on_cuda: bool) -> dict:
    """Load a DeepSpeed JSON config and fill in what this project owns (batch sizes, clipping, precision).

    Batch sizes and clipping come from the UnifiedConfig (the single source of truth); a DeepSpeed file that
    sets them differently is refused. "bf16": {"enabled": "auto"} means bf16 on CUDA, fp32 on CPU.
    """
    config: dict = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    where = f"DeepSpeed config {path}"
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        config = read_json(path, what="DeepSpeed config")
    for section in ("zero_optimization", "bf16", "fp16"):
        if not isinstance(config.get(section, {}), dict):
            raise ValueError(f"{where}: {section} must be an object, got {config[section]!r}")
    settings = train.train
    owned = {"train_micro_batch_size_per_gpu": settings.micro_batch_size,
             "gradient_accumulation_steps": settings.grad_accum_steps,
             "train_batch_size": settings.micro_batch_size * settings.grad_accum_steps * world_size,
             "gradient_clipping": settings.grad_clip}
    for key, value in owned.items():
        if key in config and config[key] not in ("auto", value):
            raise ValueError(f"{where}: {key}={config[key]!r} disagrees with the training config "
                             f"({value}); set it with --set train.* instead, or write \"auto\"")
        config[key] = value
    if "optimizer" in config or "scheduler" in config:
        raise ValueError(f"{where}: remove 'optimizer'/'scheduler'; AdamW and the lr schedule come "
                         "from the training config (train.lr, train.schedule, ...)")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {"enabled": False})
        if section.get("enabled") == "auto":
            section["enabled"] = precision == "bf16" and on_cuda
    if config["fp16"].get("enabled"):
        raise ValueError("fp16 is not supported (z-loss and QK-norm assume bf16's range); use bf16")
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if isinstance(stage, str) and stage.strip() in ("0", "1", "2", "3"):  # DeepSpeed itself accepts "2"
        stage = zero["stage"] = int(stage)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    config.setdefault("steps_per_print", 1 << 30)  # our own log lines instead
    return config


def learning_rate_factor(step: int, config: UnifiedConfig) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warm-up, then train.schedule (cosine,
    chameleon's exponential decay, or constant) down to min_lr_ratio (runkit.schedules)."""
    return Schedule.of(config.train).factor(step)


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float = 1.0,
                     encoder_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on projection and embedding matrices, none on norm weights and biases (incl. QK-norm's
    per-head (H, D) affines). Chosen by module type, not tensor rank: ZeRO-3 partitions parameters to 1-D.
    Frozen parameters (requires_grad False) are left out, so they get no optimizer state; the picture path's
    image encoder gets lr * encoder_lr_scale."""
    decayed = weight_ids(model, (torch.nn.Linear, torch.nn.Embedding, OutputHead))  # not the ViT's Conv2d
    adapter = getattr(model, "picture_adapter", None)
    encoder = {id(p) for p in adapter.encoder.parameters()} if adapter is not None else set()
    groups = []
    for in_encoder, scale in ((False, 1.0), (True, encoder_lr_scale)):
        trained = [p for p in model.parameters() if p.requires_grad and (id(p) in encoder) == in_encoder]
        groups += [group for group in decay_groups(trained, decayed, weight_decay, lr=lr * scale) if group["params"]]
    if not groups:
        raise ValueError("every parameter is frozen: nothing to train")
    return groups


def freeze_for_stage(model: UnifiedTransformer, config: UnifiedConfig) -> None:
    """Staged training: with train.freeze_lm only the picture adapter's MLP trains (stage 1); the image encoder
    trains only with train.encoder_lr_scale > 0."""
    train = config.train
    if train.freeze_lm:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("picture_adapter.adapter."))
    if model.picture_adapter is not None and train.encoder_lr_scale == 0:
        model.picture_adapter.encoder.requires_grad_(False)


def check_pictures(model: UnifiedTransformer, dataset: PackedDataset) -> None:
    """Pictures must fit the model: a continuous-path dataset holds `placeholders` <image> tokens per picture, which
    the model's encoder and pooling must give exactly at the dataset's picture size; image codes need an image
    position embedding each (model.image_positions), when the model has them."""
    for grid in dataset.info.get("image_grids") or {}:
        model.config.check_picture_grid(*parse_grid(grid), f"{dataset.root} holds {grid} pictures")
    pictures = dataset.pictures
    if not pictures:
        return
    if model.picture_adapter is None:
        raise ValueError(f"{dataset.root} holds continuous pictures (prepared with --encoder); set "
                         "train.encoder_run (or train.init_from a run with a picture adapter)")
    features = model.picture_adapter.placeholders(pictures["image_size"])
    if features != pictures["placeholders"]:
        raise ValueError(f"{dataset.root}: {pictures['placeholders']} <image> placeholders per picture, but the "
                         f"model's encoder and model.picture.pool={model.picture_adapter.pool} give {features} "
                         f"features at {pictures['image_size']} px; prepare the data with the same encoder and pool")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class LogWindow:
    """Running sums since the last log line, kept on the device so micro-steps never wait for the host."""

    def __init__(self, device: torch.device):
        # loss, text ce, image ce, z term, log Z (each summed over target tokens), then text and image token counts
        self.sums = torch.zeros(7, dtype=torch.float64, device=device)
        self.layer_stats: list[dict] = []
        self.steps = 0
        self.start = time.perf_counter()
        self.paused = 0.0  # seconds spent on checkpoints, excluded from throughput

    def add(self, output: ModelOutput) -> None:
        self.sums += torch.cat([output.sums.double(), output.tokens.double()])
        if output.layer_stats:
            self.layer_stats = output.layer_stats

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused


class Trainer:
    def __init__(self, config: UnifiedConfig, dataset: PackedDataset, out: str | os.PathLike,
                 deepspeed_config: str | None, device: str | None = None):
        self.config, self.dataset, self.out = config, dataset, Path(out)
        self.run = RunDirectory(self.out)
        on_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        # the DeepSpeed file is checked before any process group exists: a bad one fails fast, on every rank
        self.ds_config = resolve_deepspeed_config(deepspeed_config, config, int(os.environ["WORLD_SIZE"]), on_cuda)
        deepspeed = import_deepspeed(on_cpu=not on_cuda)
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
        if on_cuda:
            torch.cuda.set_device(self.device)
        else:  # share the cores between the processes on this machine (OMP_NUM_THREADS, when set, decides)
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            threads = os.environ.get("OMP_NUM_THREADS", "")
            torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                                  else max(1, (os.cpu_count() or 1) // local_world))
        self.zero_stage = zero_stage(self.ds_config)
        model = build_model(config, self.ds_config)  # the same weights on every rank; partitioned under ZeRO-3
        freeze_for_stage(model, config)
        check_pictures(model, dataset)
        self.flops_per_token = model.flops_per_token(dataset.seq_len)
        self.num_parameters = parameter_count(model)
        train = config.train
        groups = parameter_groups(model, train.weight_decay, train.lr, train.encoder_lr_scale)
        self.trainable_parameters = sum(p.numel() for group in groups for p in group["params"])
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)

        def scheduler(wrapped_optimizer):  # built on DeepSpeed's wrapper: ZeRO-3 regroups the parameters
            return torch.optim.lr_scheduler.LambdaLR(wrapped_optimizer, lambda step: learning_rate_factor(step, config))

        self.engine = wrap(model, optimizer, scheduler, self.ds_config)
        check_storable(self.engine)  # the resume state must be writable before any step is spent
        self.step = 0
        self.resumed_from: Path | None = None
        self.peak_flops = peak_flops(self.device)

    @property
    def image_grids(self) -> dict[str, int]:
        """Picture grids the model learned to draw: this dataset's, else (continuous-path data holds no codes)
        those of the run it started from, so a stage-2 model can still draw and read codes."""
        grids = self.dataset.info.get("image_grids") or {}
        if not grids and self.config.train.init_from:
            from unified_lm.model.checkpoint import resolve_run

            meta = resolve_run(self.config.train.init_from) / "meta.json"
            grids = json.loads(meta.read_text()).get("image_grids") or {}
        return grids

    @property
    def data_order(self) -> dict:
        """Everything `batch_indices` depends on besides the step: equal on resume means the same next batches."""
        train = self.config.train
        return {"world_size": self.world_size, "micro_batch_size": train.micro_batch_size,
                "grad_accum_steps": train.grad_accum_steps, "seed": train.seed, **self.dataset.identity}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def resume(self, trust_deepspeed: bool = False) -> bool:
        """Continue from the run's checkpoint: the one RUN/latest names, or, when that one is incomplete or
        damaged, the newest complete one (with a message). Reads the run's own resume state (resume.py; nothing
        unpickled) unless trust_deepspeed, which loads DeepSpeed's pickled checkpoint instead, from files you own.
        Returns whether a checkpoint was loaded."""
        required = DEEPSPEED_FILES if trust_deepspeed else RESUME_FILES
        directory = resume_checkpoint(self.out, required, self._warn,
                                      lambda note: f"--resume of {self.out}: {note}{self._resume_hint(trust_deepspeed)}")
        if directory is None:
            return False
        if trust_deepspeed:
            check_written_by_you(directory)
            load_path, saved = self.engine.load_checkpoint(str(self.run.checkpoints), tag=directory.name)
            if load_path is None:
                raise FileNotFoundError(f"DeepSpeed could not load {directory}")
        else:
            saved = load_resume_state(self.engine, directory, self.rank, self.world_size, self.zero_stage)
        saved_order = saved.get("data_order", {})
        changed = {key: (saved_order.get(key), value) for key, value in self.data_order.items()
                   if saved_order.get(key) != value}
        if changed:
            raise ValueError(f"--resume of {self.out}: the data order would differ from the interrupted run "
                             f"(saved, now): {changed}; resume with the same dataset, world size, micro-batch, "
                             "accumulation and seed, or start a new run")
        self.step = int(saved["step"])
        self.resumed_from = directory
        if self.rank == 0:  # drop log lines written after this checkpoint by the interrupted run
            self.run.truncate_log(self.step)
        return True

    def _warn(self, note: str) -> None:
        if self.rank == 0:
            print(f"[train] warning: {note}", flush=True)

    def _resume_hint(self, trust_deepspeed: bool) -> str:
        """Why --resume found no checkpoint it can use, when --resume-trust-deepspeed would."""
        if not trust_deepspeed and any(checkpoint_problem(d, DEEPSPEED_FILES) is None
                                       for d in checkpoint_dirs(self.run.checkpoints)):
            return (" (checkpoints from before the resume state hold only DeepSpeed's pickled state: pass "
                    "--resume-trust-deepspeed if you wrote them yourself)")
        return ""

    def save(self) -> Path:
        directory = self.run.checkpoint(self.step)
        if self.rank == 0 and directory.exists():  # the same step saved again after a resume: no stale files
            shutil.rmtree(directory)
        dist.barrier()
        progress = {"step": self.step, "data_order": self.data_order}
        self.engine.save_checkpoint(str(self.run.checkpoints), tag=directory.name, save_latest=False, client_state=progress)
        save_resume_state(self.engine, directory, self.rank, self.world_size, self.zero_stage, progress)
        if self.zero_stage == 3:  # every rank takes part in gathering the partitions
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if self.rank == 0:
            meta = {"step": self.step, "tokens_seen": self.step * self.tokens_per_step, "zero_stage": self.zero_stage,
                    "world_size": self.world_size, "dataset": str(self.dataset.root.resolve()),
                    "vocab_fingerprint": self.dataset.vocab.fingerprint, "image_grids": self.image_grids,
                    # parameters in the optimizer (the rest is frozen and has no optimizer state)
                    "trainable_parameters": self.trainable_parameters}
            write_model_files(directory, state, self.config, self.dataset.vocab, meta)
        dist.barrier()  # every rank's files are on disk: the checkpoint is complete
        if self.rank == 0:  # files.json, latest, then keep the newest checkpoints either resume path can use
            commit_checkpoint(directory, self.config.train.keep_checkpoints, RESUME_FILES, DEEPSPEED_FILES)
            from unified_lm.train.plot import plot_losses  # matplotlib: ~0.6 s of import, paid only at a checkpoint

            plot_losses(self.run.log, self.out / "loss.png")
        dist.barrier()
        return directory

    # -- training -----------------------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        train = self.config.train
        return train.micro_batch_size * train.grad_accum_steps * self.world_size * self.dataset.seq_len

    def _rows(self, micro_step: int, rank: int) -> list[int]:
        train = self.config.train
        return batch_indices(self.step, micro_step, rank, self.world_size, train.micro_batch_size,
                             train.grad_accum_steps, len(self.dataset), train.seed)

    def _step_targets(self) -> int:
        """Target tokens in this optimizer step's rows across all micro-steps and ranks (a pure function of the
        step, so each rank counts it locally with no communication)."""
        return self.dataset.count_targets([i for micro_step in range(self.config.train.grad_accum_steps)
                                           for rank in range(self.world_size) for i in self._rows(micro_step, rank)])

    def train_step(self, collect_stats: bool, window: LogWindow | None = None) -> LogWindow:
        """One optimizer step over grad_accum_steps micro-batches, its losses added into `window`.

        Every target token of the step weighs the same: each micro-batch's loss sum is divided by its share of
        the step's target count, and DeepSpeed's 1/accum scaling and rank averaging complete the mean. A
        non-finite loss on any rank raises TrainingDiverged before the update, on every rank at once."""
        train = self.config.train
        torch.manual_seed(hash((train.seed, self.step, self.rank)) % (1 << 63))  # dropout: a function of the step
        window = window or LogWindow(self.device)
        share = max(1, self._step_targets()) / (train.grad_accum_steps * self.world_size)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for micro_step in range(train.grad_accum_steps):
            batch = self.dataset.batch(self._rows(micro_step, self.rank)).to(self.device)
            output = micro_batch_loss(self.engine, batch, share, layer_stats=collect_stats and micro_step == 0)
            finite &= torch.isfinite(output.loss.detach())
            self.engine.backward(output.loss)
            if micro_step == train.grad_accum_steps - 1:
                self._raise_if_diverged(finite, "loss")  # one host sync per optimizer step, before the update
            self.engine.step()
            window.add(output)
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):  # the update is poisoned: stop before any save
            self._raise_if_diverged(torch.zeros((), dtype=torch.bool, device=self.device), "gradient norm")
        window.steps += 1
        return window

    def _raise_if_diverged(self, finite: torch.Tensor, what: str) -> None:
        bad = (~finite).float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            latest = latest_text(self.out)
            kept = self.run.checkpoints / latest if latest is not None else "none (no checkpoint yet)"
            raise TrainingDiverged(f"{what} is not finite at step {self.step + 1}; stopping without saving this "
                                   f"step. Last good checkpoint: {kept}. Lower train.lr, raise model.z_loss_weight, "
                                   "or enable model.qk_norm.")

    def _reduce(self, window: LogWindow) -> dict:
        sums = window.sums.clone()
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss, text_ce, image_ce, z_term, log_z, text_tokens, image_tokens = sums.tolist()
        tokens = max(1.0, text_tokens + image_tokens)
        return {"loss": loss / tokens, "text_loss": text_ce / text_tokens if text_tokens else None,
                "image_loss": image_ce / image_tokens if image_tokens else None, "z_loss": z_term / tokens,
                "log_z": log_z / tokens, "text_tokens": int(text_tokens), "image_tokens": int(image_tokens)}

    def _layer_stats(self, window: LogWindow) -> dict:
        """Per-layer max |q.k| logit and output RMS, the maximum over ranks (all ranks collect on the same steps)."""
        if not window.layer_stats:
            return {}
        stats = torch.stack([torch.stack([s["max_qk_logit"].float(), s["output_rms"].float()])
                             for s in window.layer_stats]).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        return {"max_qk_logit": [round(v, 4) for v in stats[:, 0].tolist()],
                "output_rms": [round(v, 4) for v in stats[:, 1].tolist()]}

    def train(self) -> dict:
        train = self.config.train
        self.engine.train()
        window = LogWindow(self.device)
        record: dict = {}
        while self.step < train.steps:
            collect_stats = (self.step + 1) % train.stats_every == 0 or self.step == 0
            self.train_step(collect_stats, window)
            self.step += 1
            if self.step % train.log_every == 0 or self.step == train.steps:
                record = self._log(window)
                window = LogWindow(self.device)
            if self.step % train.checkpoint_every == 0 or self.step == train.steps:
                started = time.perf_counter()
                self.save()
                window.paused += time.perf_counter() - started
        return record

    def _log(self, window: LogWindow) -> dict:
        """One JSONL line: losses averaged over the target tokens of every step since the last line (all ranks),
        the last step's grad norm and lr, throughput, and the per-layer stability signals when collected."""
        record = {"step": self.step, **self._reduce(window)}
        norm = self.engine.get_global_grad_norm()
        record["grad_norm"] = None if norm is None else float(norm)
        # of the step just taken; train.lr * factor, as LambdaLR computes it (not Schedule.lr's order of operations)
        record["lr"] = self.config.train.lr * learning_rate_factor(self.step - 1, self.config)
        tokens_per_second = window.steps * self.tokens_per_step / window.seconds
        record["tokens_per_s"] = round(tokens_per_second, 1)
        record["mfu"] = (self.flops_per_token * tokens_per_second / (self.peak_flops * self.world_size)
                         if self.peak_flops else None)
        record.update(self._layer_stats(window))
        if self.rank == 0:
            self.run.append_log(record)
            image = f"{record['image_loss']:.3f}" if record["image_loss"] is not None else "-"
            text = f"{record['text_loss']:.3f}" if record["text_loss"] is not None else "-"
            mfu = f" mfu {100 * record['mfu']:.1f}%" if record["mfu"] else ""
            print(f"step {self.step:6d} loss {record['loss']:.4f} text {text} image {image} "
                  f"logZ {record['log_z']:.2f} grad {record['grad_norm'] or 0:.3f} lr {record['lr']:.2e} "
                  f"{tokens_per_second:,.0f} tok/s{mfu}", flush=True)
        return record
