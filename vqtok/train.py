"""`vqtok train`: tokenizer training with exact resume, JSONL logs, codebook health and reconstruction grids.

One step: reconstruction (L1/L2) + LPIPS + commitment (+ adaptive-weighted hinge GAN after
`loss.adversarial_start`), AdamW with clipping, then a discriminator step when the GAN is active.
Data parallel through torch.distributed (DDP; the quantizer syncs its codebook statistics itself).
Batches are a pure function of (seed, step), RNG states are checkpointed, so resuming at step s continues
exactly as an uninterrupted run would.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from runkit.checkpoints import flatten_optimizer, load_weights, restore_optimizer, resume_checkpoint
from runkit.distributed import DistributedContext
from runkit.files import atomic_write_text, load_tensors, read_json
from runkit.runs import RunDirectory
from runkit.schedules import Schedule

from . import losses
from .checkpoint import RESUME_FILES, save_checkpoint, untrained_tokenizer
from .config import VQConfig
from .data import CropDataset, ImageSource, StepBatchSampler, load_eval_images
from .images import save_grid
from .metrics import RollingCodeUsage, psnr

log = logging.getLogger(__name__)

KMEANS_VECTORS_PER_CODE = 16
KMEANS_MAX_DISTANCES = 1 << 26  # k-means (quantizer.kmeans_plus_plus) holds a (vectors, codes) distance matrix


def learning_rate(config: VQConfig, step: int) -> float:
    """lr of optimizer step `step` (0-based): linear warm-up, then cosine down to lr * min_lr_ratio."""
    return Schedule.of(config.train).lr(step, config.train.lr)


class Trainer:
    def __init__(self, config: VQConfig, run_dir: str | Path, train_paths: list[Path] | list[ImageSource], sample_paths: list[Path],
                 context: DistributedContext = DistributedContext(), lpips_model: torch.nn.Module | None = None):
        self.config = config.validate()
        if not config.model.has_decoder:
            raise ValueError("model.has_decoder is False: an encoder-only tokenizer cannot be trained (training "
                             "reconstructs pictures)")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = RunDirectory(self.run_dir)
        self.context = context
        self.device = context.device
        self.model = untrained_tokenizer(config).to(self.device)
        self.discriminator = self._build_discriminator()
        self.lpips = lpips_model.to(self.device) if lpips_model is not None else None
        # one group, decay on every parameter: vqtok's rule (the others split off norms and biases, runkit.optim)
        self.optimizer = self._adamw(self.model.parameters(), config.train.lr)
        self.disc_optimizer = (self._adamw(self.discriminator.parameters(), config.train.discriminator_lr or config.train.lr)
                               if self.discriminator is not None else None)
        self.dataset = CropDataset(train_paths, config.model.resolution, config.train.crop_size, config.train.scale_range,
                                   config.train.permute_channels)
        self.sample_paths = sample_paths
        self._sample_images: torch.Tensor | None = None  # loaded on first use, reused for every grid
        self.usage = RollingCodeUsage(config.quantizer.codebook_size, config.train.usage_window)
        self.step = 0
        self.ddp_model = self._wrap(self.model)
        self.ddp_discriminator = self._wrap(self.discriminator) if self.discriminator is not None else None

    # ----------------------------------------------------------------- construction
    def _build_discriminator(self):
        loss = self.config.loss
        if loss.adversarial_weight <= 0:
            return None
        return losses.PatchDiscriminator(self.config.model.in_channels, loss.discriminator_channels,
                                         loss.discriminator_layers).to(self.device)

    def _adamw(self, params, lr: float) -> torch.optim.AdamW:
        train = self.config.train
        return torch.optim.AdamW(params, lr=lr, betas=train.betas, weight_decay=train.weight_decay)

    def _wrap(self, module: torch.nn.Module):
        if not self.context.enabled:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (EMA codebook) are kept in sync by the quantizer itself; broadcasting rank 0's would drop
        # the other ranks' statistics. The quantizer's own parameters sit idle during an autoencoder warm-up.
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False,
                                       find_unused_parameters=self.config.train.quantizer_warmup_steps > 0)

    def _autocast(self):
        if self.device.type == "cuda" and self.config.train.bf16_on_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ----------------------------------------------------------------- the loop
    def train(self, steps: int | None = None) -> dict:
        total = steps if steps is not None else self.config.train.steps
        train = self.config.train
        self._warn_if_revival_too_eager()
        if self.context.is_main:
            log.info("training on %s", json.dumps(self.dataset.describe()))
        # Per-source sizes: the sampler gives every source an equal share (see StepBatchSampler).
        sampler = StepBatchSampler(self.dataset.source_sizes, train.batch_size * self.context.world_size, total, train.seed,
                                   start_step=self.step, rank=self.context.rank, world_size=self.context.world_size)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=train.num_workers,
                                             persistent_workers=False)
        last, window = {}, []
        tick = time.perf_counter()
        for images in loader:
            if self.quantizing:  # after the autoencoder warm-up: k-means on the trained latents, once
                self._maybe_initialize_codebook()
            window.append(self.train_step(images.to(self.device, non_blocking=True)))
            self.step += 1
            if self.step % train.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - tick
                tick = time.perf_counter()
                last = self._log(window, elapsed / len(window))
                window = []
            if self.step % train.sample_every == 0 or self.step == total:
                self.save_samples()
            if self.step % train.checkpoint_every == 0 or self.step == total:
                self.save()
        return last

    @property
    def quantizing(self) -> bool:
        """False during the autoencoder warm-up (train.quantizer_warmup_steps)."""
        return self.step >= self.config.train.quantizer_warmup_steps

    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        cfg = self.config
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with self._autocast():
            out = self.ddp_model(images, quantize=self.quantizing)
            reconstruction = out.reconstruction.float()
            rec_loss = losses.reconstruction_loss(images, reconstruction, cfg.loss.l1_weight, cfg.loss.l2_weight)
            perceptual = (self.lpips(images, reconstruction).mean() if self.lpips is not None and cfg.loss.perceptual_weight > 0
                          else rec_loss.new_zeros(()))
            nll = rec_loss + cfg.loss.perceptual_weight * perceptual
            loss = nll + out.commitment_loss
            metrics = {"loss_reconstruction": rec_loss.item(), "loss_perceptual": perceptual.item(),
                       "loss_commitment": out.commitment_loss.item()}
            if self._adversarial_active():
                loss = loss + self._generator_adversarial_term(nll, reconstruction, metrics)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip))
        self.optimizer.step()
        if self._adversarial_active():
            metrics["loss_discriminator"] = self._discriminator_step(images, reconstruction.detach())
        if out.indices is not None:
            self.usage.update(self._gather_indices(out.indices))
        metrics.update(loss=loss.item(), lr=lr, psnr=float(psnr(images, reconstruction.detach()).mean()))
        return metrics

    def _adversarial_active(self) -> bool:
        return self.discriminator is not None and self.step >= self.config.loss.adversarial_start

    def _generator_adversarial_term(self, nll: torch.Tensor, reconstruction: torch.Tensor, metrics: dict) -> torch.Tensor:
        self.discriminator.requires_grad_(False)  # the generator step must not move D
        generator_loss = losses.generator_adversarial_loss(self.discriminator(reconstruction))
        self.discriminator.requires_grad_(True)
        weight = losses.adaptive_weight(nll, generator_loss, self.model.last_decoder_layer,
                                        self.config.loss.adaptive_weight_max)
        metrics.update(loss_generator=generator_loss.item(), adaptive_weight=weight.item())
        return self.config.loss.adversarial_weight * weight * generator_loss

    def _discriminator_step(self, images: torch.Tensor, reconstruction: torch.Tensor) -> float:
        with self._autocast():
            logits = self.ddp_discriminator(torch.cat([images, reconstruction]))
            real, fake = logits.float().chunk(2)
            loss = losses.discriminator_hinge_loss(real, fake)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.config.train.grad_clip)
        self.disc_optimizer.step()
        return loss.item()

    def _gather_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if not self.context.enabled:
            return indices
        gathered = [torch.empty_like(indices) for _ in range(self.context.world_size)]
        dist.all_gather(gathered, indices.contiguous())
        return torch.cat(gathered)

    def _warn_if_revival_too_eager(self) -> None:
        quant, train = self.config.quantizer, self.config.train
        if quant.kind != "vq":
            return
        tokens_per_step = train.batch_size * self.context.world_size * (train.crop_size // self.config.model.downsample_factor) ** 2
        mean_assignments = tokens_per_step / quant.codebook_size
        if quant.ema and quant.dead_code_threshold >= mean_assignments and self.context.is_main:
            log.warning("quantizer.dead_code_threshold=%g >= the average code's assignments per step (%d tokens / %d codes "
                        "= %.4f): most codes will be re-seeded every step; lower it to ~%.3g",
                        quant.dead_code_threshold, tokens_per_step, quant.codebook_size, mean_assignments, mean_assignments / 6)

    @torch.no_grad()
    def _maybe_initialize_codebook(self) -> None:
        """k-means on one wide no-grad pass instead of a training batch: KMEANS_VECTORS_PER_CODE vectors per code
        (within the library's memory bound), so content that is rare in a batch still gets a code of its own (with
        one vector per code, as many codes start on copies of the commonest content as there are copies of it)."""
        quantizer = self.model.quantizer
        if not quantizer.needs_initialisation:
            return
        crop = self.config.train.crop_size
        tokens_per_crop = (crop // self.config.model.downsample_factor) ** 2
        codes = self.config.quantizer.codebook_size
        vectors = min(KMEANS_VECTORS_PER_CODE * codes, max(codes, KMEANS_MAX_DISTANCES // codes))
        count = max(self.config.train.batch_size, math.ceil(vectors / tokens_per_crop / self.context.world_size))
        seeds = np.random.SeedSequence([self.config.train.seed, 1_000_003, self.context.rank]).generate_state(count)
        items = [(self.dataset.interleaved_index(i), int(s)) for i, s in enumerate(seeds)]  # every source, balanced
        self.model.train()
        latents = []
        for start in range(0, count, 32):
            batch = torch.stack([self.dataset[item] for item in items[start : start + 32]]).to(self.device)
            latents.append(self.model.quant_conv(self.model.encoder(batch)).float())
        vectors = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) for z in latents])
        if self.context.enabled:  # every rank initialises from the same vectors, so the codebooks agree
            gathered = [torch.empty_like(vectors) for _ in range(self.context.world_size)]
            dist.all_gather(gathered, vectors.contiguous())
            vectors = torch.cat(gathered)
        quantizer.initialise(vectors, seed=self.config.train.seed)
        log.info("codebook initialised by k-means++ on %d vectors (%d distinct)", len(vectors),
                 len(torch.unique(vectors, dim=0)))

    # ----------------------------------------------------------------- logging and samples
    def _log(self, window: list[dict], seconds_per_step: float) -> dict:
        """One JSONL row per `log_every` steps: each metric averaged over the steps since the last row."""
        names = {name for metrics in window for name in metrics}
        averages = {name: sum(m[name] for m in window if name in m) / sum(name in m for m in window) for name in names}
        record = {"step": self.step, "lr": window[-1]["lr"], **{k: round(v, 6) for k, v in sorted(averages.items()) if k != "lr"}}
        stats = self.usage.statistics()
        record.update(codebook_usage=round(stats["usage"], 5), code_perplexity=round(stats["perplexity"], 2),
                      usage_window_tokens=stats["tokens"], seconds_per_step=round(seconds_per_step, 4),
                      images_per_second=round(self.config.train.batch_size * self.context.world_size / max(seconds_per_step, 1e-9), 2))
        if self.context.is_main:
            self.run.append_log(record)
            log.info("step %d loss %.4f rec %.4f psnr %.2f usage %.1f%% ppl %.0f %.2fs/step", self.step, record["loss"],
                     record["loss_reconstruction"], record["psnr"], 100 * record["codebook_usage"],
                     record["code_perplexity"], seconds_per_step)
        return record

    @torch.no_grad()
    def save_samples(self, count: int = 6) -> None:
        if not self.context.is_main or not self.sample_paths:
            return
        if self._sample_images is None:
            self._sample_images = load_eval_images(self.sample_paths[:count], self.config.model.resolution)[0].to(self.device)
        images = self._sample_images
        self.model.eval()
        reconstruction = self.model.decode(self.model.encode(images))
        save_grid([images, reconstruction], self.run_dir / "samples" / f"step_{self.step:08d}.png")

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        self._check_replicas_in_sync()
        if not self.context.is_main:
            self.context.barrier()
            return None
        tensors, description = flatten_optimizer(self.optimizer, "optimizer")
        tensors.update({f"usage.{k}": v for k, v in self.usage.state().items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        meta = {"optimizer": description}
        if self.discriminator is not None:
            disc_tensors, disc_description = flatten_optimizer(self.disc_optimizer, "disc_optimizer")
            tensors.update(disc_tensors)
            tensors.update({f"discriminator.{k}": v.detach().cpu().contiguous() for k, v in self.discriminator.state_dict().items()})
            meta["disc_optimizer"] = disc_description
        path = save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self.config, tensors, meta,
                               {"train_usage": self.usage.statistics(), "train_data": self.dataset.describe()},
                               keep=self.config.train.keep_checkpoints)
        self.context.barrier()
        return path

    def resume(self) -> bool:
        """Continue from the run's checkpoint (the one RUN/latest names, or the newest complete one when that is
        damaged, with a warning); returns whether a checkpoint was loaded."""
        directory = resume_checkpoint(self.run_dir, RESUME_FILES, lambda note: log.warning("%s", note))
        if directory is None:
            return False
        saved = VQConfig.from_dict(read_json(directory / "config.json"))
        if (saved.model, saved.quantizer) != (self.config.model, self.config.quantizer):
            raise ValueError(f"cannot resume {self.run_dir}: its model/quantizer config differs from the requested one "
                             "(use a new --out directory)")
        load_weights(self.model, directory / "model.safetensors")
        tensors = load_tensors(directory / "trainer.safetensors")
        meta = read_json(directory / "trainer.json")
        restore_optimizer(self.optimizer, "optimizer", tensors, meta["optimizer"])
        self.usage.load_state({k[len("usage."):]: v for k, v in tensors.items() if k.startswith("usage.")})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        if self.discriminator is not None:
            if "disc_optimizer" not in meta:
                raise ValueError(f"{directory}: checkpoint has no discriminator state but the config enables the GAN")
            self.discriminator.load_state_dict({k[len("discriminator."):]: v for k, v in tensors.items() if k.startswith("discriminator.")})
            restore_optimizer(self.disc_optimizer, "disc_optimizer", tensors, meta["disc_optimizer"])
        self.step = read_json(directory / "meta.json")["step"]
        if self.context.is_main:  # drop log rows written after the checkpoint, so no step appears twice
            self.run.truncate_log(self.step)
        log.info("resumed %s at step %d", directory, self.step)
        return True

    def _check_replicas_in_sync(self) -> None:
        """DDP should keep every replica identical; verify it cheaply before writing rank 0's copy."""
        if not self.context.enabled:
            return
        fingerprint = torch.stack([t.detach().double().sum() for t in self.model.state_dict().values() if t.is_floating_point()]).sum()
        fingerprint = fingerprint.reshape(1).to(self.device)
        gathered = [torch.empty_like(fingerprint) for _ in range(self.context.world_size)]
        dist.all_gather(gathered, fingerprint)
        values = torch.cat(gathered)
        if not torch.allclose(values, values[0], rtol=1e-9, atol=1e-6):
            raise RuntimeError(f"data-parallel replicas diverged at step {self.step}: parameter sums {values.tolist()}")
        if self.context.is_main:
            atomic_write_text(self.run_dir / "replicas.json", json.dumps({"step": self.step, "world_size": self.context.world_size,
                                                                          "in_sync": True, "fingerprints": values.tolist()}))
