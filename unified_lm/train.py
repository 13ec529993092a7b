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
        model.safetensors config.json meta.json  weights to share and sample from (nothing pickled)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's resume state (torch pickles: only resume
                                                     runs you wrote yourself)

The batch of every step is a pure function of the step number (`packing.batch_indices`) and the dropout RNG is
re-seeded from (seed, step, rank), so `--resume` continues exactly: same data position, same next loss.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from vqtok.checkpoint import atomic_write_text

from .config import UnifiedConfig
from .model import ModelOutput, UnifiedTransformer
from .packing import PackedDataset, batch_indices
from .plot import plot_losses

log = logging.getLogger("unified_lm")

CHECKPOINT_DIR = "checkpoints"
# Dense bf16 tensor-core peak per GPU, FLOP/s, for the MFU estimate (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class TrainingDiverged(RuntimeError):
    pass


def ensure_launch_env() -> None:
    """Single-process runs without a launcher: give torch.distributed the env a launcher would set."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(os.environ.get("MASTER_PORT", port)))


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
    if path:
        try:
            config = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"DeepSpeed config not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path}: invalid JSON ({err})") from None
    settings = train.train
    owned = {"train_micro_batch_size_per_gpu": settings.micro_batch_size,
             "gradient_accumulation_steps": settings.grad_accum_steps,
             "train_batch_size": settings.micro_batch_size * settings.grad_accum_steps * world_size,
             "gradient_clipping": settings.grad_clip}
    for key, value in owned.items():
        if key in config and config[key] not in ("auto", value):
            raise ValueError(f"DeepSpeed config {path}: {key}={config[key]} disagrees with the training config "
                             f"({value}); set it with --set train.* instead, or write \"auto\"")
        config[key] = value
    if "optimizer" in config or "scheduler" in config:
        raise ValueError(f"DeepSpeed config {path}: remove 'optimizer'/'scheduler'; AdamW and the lr schedule come "
                         "from the training config (train.lr, train.schedule, ...)")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {"enabled": False})
        if section.get("enabled") == "auto":
            section["enabled"] = precision == "bf16" and on_cuda
    if config["fp16"].get("enabled"):
        raise ValueError("fp16 is not supported (z-loss and QK-norm assume bf16's range); use bf16")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config {path}: zero_optimization.stage must be 0-3, got {stage}")
    config.setdefault("steps_per_print", 1 << 30)  # our own log lines instead
    return config


def learning_rate_factor(step: int, config: UnifiedConfig) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based)."""
    train = config.train
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    if train.schedule == "chameleon":  # exponential decay from the peak down to min_lr_ratio at the last step
        return train.min_lr_ratio ** progress
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embeddings), none on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


@dataclass
class StepMetrics:
    """Sums over one optimizer step's micro-batches (this rank), reduced across ranks before logging."""

    loss: float = 0.0
    text_ce: float = 0.0
    image_ce: float = 0.0
    z_loss: float = 0.0
    log_z: float = 0.0
    text_tokens: float = 0.0
    image_tokens: float = 0.0
    micro_batches: int = 0


class Trainer:
    def __init__(self, config: UnifiedConfig, dataset: PackedDataset, out: str | os.PathLike,
                 deepspeed_config: str | None, device: str | None = None):
        self.config, self.dataset, self.out = config, dataset, Path(out)
        on_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        deepspeed = import_deepspeed(on_cpu=not on_cuda)
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
        if on_cuda:
            torch.cuda.set_device(self.device)
        else:  # share the cores between the processes on this machine
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        self.ds_config = resolve_deepspeed_config(deepspeed_config, config, self.world_size, on_cuda)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        if self.zero_stage == 3:  # build partitioned: a model too large for one device never exists whole
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                model = UnifiedTransformer(config.model)
            if config.model.tied_embeddings:  # the output head uses the embedding outside the embedding's forward
                deepspeed.zero.register_external_parameter(model.lm_head, model.embed.weight)
        else:
            model = UnifiedTransformer(config.model)
        self.flops_per_token = model.flops_per_token(dataset.seq_len)
        self.num_parameters = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        train = config.train
        optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr,
                                      betas=(train.beta1, train.beta2), eps=train.eps)

        def scheduler(wrapped_optimizer):  # built on DeepSpeed's wrapper: ZeRO-3 regroups the parameters
            return torch.optim.lr_scheduler.LambdaLR(wrapped_optimizer, lambda step: learning_rate_factor(step, config))

        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=self.ds_config)
        self.step = 0
        self.peak_flops = peak_flops(self.device)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        latest = self.out / "latest"
        if not latest.is_file():
            return False
        tag = latest.read_text().strip()
        load_path, client_state = self.engine.load_checkpoint(str(self.out / CHECKPOINT_DIR), tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"{latest} names {tag}, but DeepSpeed could not load {self.out / CHECKPOINT_DIR / tag}")
        self.step = int(client_state["step"])
        if self.rank == 0:  # drop log lines written after this checkpoint by the interrupted run
            self._truncate_log(self.step)
        return True

    def save(self) -> Path:
        tag = f"step_{self.step:08d}"
        directory = self.out / CHECKPOINT_DIR / tag
        self.engine.save_checkpoint(str(self.out / CHECKPOINT_DIR), tag=tag, save_latest=False,
                                    client_state={"step": self.step})
        if self.zero_stage == 3:  # every rank takes part in gathering the partitions
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if self.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, directory / "model.safetensors")
            (directory / "config.json").write_text(self.config.to_json())
            self.dataset.vocab.save(directory / "vocab")
            meta = {"step": self.step, "tokens_seen": self.step * self.tokens_per_step, "zero_stage": self.zero_stage,
                    "world_size": self.world_size, "dataset": str(self.dataset.root.resolve()),
                    "vocab_fingerprint": self.dataset.vocab.fingerprint}
            (directory / "meta.json").write_text(json.dumps(meta, indent=2))
            atomic_write_text(self.out / "latest", tag + "\n")
            self._prune()
            plot_losses(self.out / "log.jsonl", self.out / "loss.png")
        dist.barrier()
        return directory

    def _prune(self) -> None:
        done = sorted(p for p in (self.out / CHECKPOINT_DIR).glob("step_*") if (p / "model.safetensors").is_file())
        for old in done[: max(0, len(done) - self.config.train.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def _truncate_log(self, step: int) -> None:
        path = self.out / "log.jsonl"
        if path.exists():
            lines = [line for line in path.read_text().splitlines(keepends=True)
                     if line.endswith("\n") and json.loads(line)["step"] <= step]
            atomic_write_text(path, "".join(lines))

    # -- training -----------------------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        train = self.config.train
        return train.micro_batch_size * train.grad_accum_steps * self.world_size * self.dataset.seq_len

    def _micro_batch(self, micro_step: int):
        train = self.config.train
        indices = batch_indices(self.step, micro_step, self.rank, self.world_size, train.micro_batch_size,
                                train.grad_accum_steps, len(self.dataset), train.seed)
        return self.dataset.batch(indices).to(self.device)

    def train_step(self, collect_stats: bool, metrics: StepMetrics | None = None) -> tuple[StepMetrics, list[dict]]:
        """One optimizer step over grad_accum_steps micro-batches, adding its losses into `metrics` (the log
        window's running sums). Raises TrainingDiverged before any update that a non-finite loss would poison,
        on every rank at once."""
        train = self.config.train
        torch.manual_seed(hash((train.seed, self.step, self.rank)) % (1 << 63))  # dropout: a function of the step
        metrics, layer_stats = metrics if metrics is not None else StepMetrics(), []
        for micro_step in range(train.grad_accum_steps):
            batch = self._micro_batch(micro_step)
            output: ModelOutput = self.engine(batch.inputs, **batch.model_kwargs(),
                                              collect_stats=collect_stats and micro_step == 0)
            self._check_finite(output.loss)
            self.engine.backward(output.loss)
            self.engine.step()
            self._accumulate(metrics, output)
            layer_stats = output.layer_stats or layer_stats
        return metrics, layer_stats

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            latest = self.out / "latest"
            kept = self.out / CHECKPOINT_DIR / latest.read_text().strip() if latest.is_file() else "none (no checkpoint yet)"
            raise TrainingDiverged(f"loss is not finite at step {self.step + 1} (value on rank {self.rank}: "
                                   f"{loss.item()}); stopping without updating the weights. Last good checkpoint: "
                                   f"{kept}. Lower train.lr, raise model.z_loss_weight, or enable model.qk_norm.")

    @staticmethod
    def _accumulate(metrics: StepMetrics, output: ModelOutput) -> None:
        text_tokens, image_tokens = (float(t) for t in output.tokens)
        metrics.loss += float(output.loss.detach())
        metrics.text_ce += float(output.text_loss) * text_tokens if text_tokens else 0.0
        metrics.image_ce += float(output.image_loss) * image_tokens if image_tokens else 0.0
        metrics.z_loss += float(output.z_loss)
        metrics.log_z += float(output.log_z)
        metrics.text_tokens += text_tokens
        metrics.image_tokens += image_tokens
        metrics.micro_batches += 1

    def _reduce(self, metrics: StepMetrics) -> dict:
        values = torch.tensor([metrics.loss, metrics.text_ce, metrics.image_ce, metrics.z_loss, metrics.log_z,
                               metrics.text_tokens, metrics.image_tokens, metrics.micro_batches],
                              dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(values)
        loss, text_ce, image_ce, z_loss, log_z, text_tokens, image_tokens, micro_batches = values.tolist()
        return {"loss": loss / micro_batches, "text_loss": text_ce / text_tokens if text_tokens else None,
                "image_loss": image_ce / image_tokens if image_tokens else None, "z_loss": z_loss / micro_batches,
                "log_z": log_z / micro_batches, "text_tokens": int(text_tokens), "image_tokens": int(image_tokens)}

    def train(self) -> dict:
        train = self.config.train
        self.engine.train()
        window_start, window_steps, window = time.perf_counter(), 0, StepMetrics()
        record: dict = {}
        stats: list[dict] = []
        while self.step < train.steps:
            collect_stats = (self.step + 1) % train.stats_every == 0 or self.step == 0
            _, layer_stats = self.train_step(collect_stats, window)
            stats = layer_stats if collect_stats else stats
            self.step += 1
            window_steps += 1
            if self.step % train.log_every == 0 or self.step == train.steps:
                elapsed = time.perf_counter() - window_start
                record = self._log(window, stats, window_steps / elapsed)
                window_start, window_steps, window, stats = time.perf_counter(), 0, StepMetrics(), []
            if self.step % train.checkpoint_every == 0 or self.step == train.steps:
                self.save()
        return record

    def _log(self, metrics: StepMetrics, layer_stats: list[dict], steps_per_second: float) -> dict:
        """One JSONL line: losses averaged over the steps since the last line (all ranks), the last step's grad
        norm and lr, throughput, and the per-layer stability signals when this window collected them."""
        record = {"step": self.step, **self._reduce(metrics)}
        norm = self.engine.get_global_grad_norm()
        record["grad_norm"] = None if norm is None else float(norm)
        record["lr"] = self.scheduler.get_last_lr()[0]
        tokens_per_second = steps_per_second * self.tokens_per_step
        record["tokens_per_s"] = round(tokens_per_second, 1)
        record["mfu"] = (self.flops_per_token * tokens_per_second / (self.peak_flops * self.world_size)
                         if self.peak_flops else None)
        if layer_stats:
            record["max_qk_logit"] = [round(float(s["max_qk_logit"]), 4) for s in layer_stats]
            record["output_rms"] = [round(float(s["output_rms"]), 4) for s in layer_stats]
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            image = f"{record['image_loss']:.3f}" if record["image_loss"] is not None else "-"
            text = f"{record['text_loss']:.3f}" if record["text_loss"] is not None else "-"
            mfu = f" mfu {100 * record['mfu']:.1f}%" if record["mfu"] else ""
            print(f"step {self.step:6d} loss {record['loss']:.4f} text {text} image {image} "
                  f"logZ {record['log_z']:.2f} grad {record['grad_norm'] or 0:.3f} lr {record['lr']:.2e} "
                  f"{tokens_per_second:,.0f} tok/s{mfu}", flush=True)
        return record
