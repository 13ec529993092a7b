"""`unified-lm encoder train | eval`: contrastive training of the image encoder on captioned pictures, and
zero-shot classification of held-out world pictures.

Training pairs: the (picture, caption) pairs of the world's train split, i.e. its image_to_text documents
(caption without the "Caption: " prefix) and text_to_image documents (the same kind of caption, before the
picture), plus optionally a JSONL file of {"image": PATH, "text": CAPTION} (relative paths are read from the
file's directory). All pictures are decoded once into a uint8 array at the encoder's image_size.

The step: AdamW (decay on matrices only), linear warm-up then cosine to lr * min_lr_ratio, gradient clipping.
The batch of step s is a pure function of (train.seed, s): positions s*B .. s*B+B-1 of the endless sequence of
per-epoch permutations (`batch_indices`), and the torch RNG is re-seeded from (seed, step) before each step, so
`--resume` continues exactly (same batches, same next loss) from a checkpoint's weights and optimizer moments.

Run directory:

    RUN/config.json     the full EncoderConfig (text.vocab_size and text.pad_id filled in)
    RUN/log.jsonl       one line per log step: step, loss, temperature, bias, lr, grad_norm, images_per_s
                        (+ "zero_shot" on eval steps)
    RUN/latest          names the newest complete checkpoint (step_XXXXXXXX under RUN/checkpoints/)
    RUN/checkpoints/step_XXXXXXXX/
        model.safetensors config.json meta.json vocab/    what `load_encoder` needs
        optimizer.safetensors optimizer.json              AdamW moments + param groups (resume only)
    RUN/zero_shot.json  zero-shot accuracies on the held-out world after the last step

A checkpoint is written into step_X.tmp/ and renamed, then `latest` is replaced atomically, so `latest` never
names a partial checkpoint; the newest train.keep_checkpoints are kept.

Zero-shot (`zero_shot`): every held-out world picture with exactly one object is classified by the nearest
prompt embedding, among "a red circle." (24 colour+shape classes, the article as in the captions: "an orange
cross."), "a circle." (4 shapes) and "something red." (6 colours); and image -> text retrieval: each held-out
captioned picture against all held-out captions, correct when the retrieved caption equals its own
(identical captions describe identical scenes).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from runkit.batches import walk_rows
from runkit.checkpoints import (
    commit_checkpoint,
    flatten_optimizer,
    load_weights,
    restore_optimizer,
    resume_checkpoint,
    staging_dir,
)
from runkit.files import atomic_write_text, file_sha256, load_tensors, read_json, read_jsonl
from runkit.optim import decay_groups, weight_ids
from runkit.runs import RunDirectory, latest_text
from runkit.schedules import Schedule
from runkit.typed_config import changed_fields
from unified_lm.tokens.documents import check_keys, unicode_text
from unified_lm.tokens.vocab import Vocabulary
from unified_lm.vision.contrastive import (
    ENCODER_FILES,
    ContrastiveModel,
    EncoderConfig,
    EncoderTrainConfig,
    load_pictures,
    pixels_from_uint8,
    read_encoder_config,
    read_pictures_uint8,
    tokenize_captions,
)
from unified_lm.world.corpus import CAPTION_PREFIX, COLOURS, SHAPES, _count_phrase, read_documents, read_scenes

CAPTIONED_KINDS = ("image_to_text", "text_to_image")
# Fields that may differ when a run is resumed: they change neither the model nor the order of the batches.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every")
RESUME_FILES = ENCODER_FILES + ("meta.json", "optimizer.safetensors", "optimizer.json")


# -----------------------------------------------------------------------------
# Data

def check_world(world_dir: str | os.PathLike) -> Path:
    world_dir = Path(world_dir)
    if not (world_dir / "world.json").is_file():
        raise FileNotFoundError(f"world directory {world_dir}: no world.json (make one with `unified-lm world`)")
    return world_dir


def captioned_pairs(world_dir: str | os.PathLike, split: str) -> list[tuple[Path, str]]:
    """(picture path, caption) of the split's image_to_text and text_to_image documents, in file order."""
    world_dir = check_world(world_dir)
    pairs = []
    for document in read_documents(world_dir, split):
        if document["kind"] in CAPTIONED_KINDS:
            image = next(segment["image"] for segment in document["segments"] if "image" in segment)
            text = next(segment["text"] for segment in document["segments"] if "text" in segment)
            pairs.append((world_dir / image, text.removeprefix(CAPTION_PREFIX)))
    return pairs


def read_pairs_file(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """JSONL lines {"image": PATH, "text": CAPTION}; relative paths are relative to the file's directory. Other
    keys, non-UTF-8 bytes and lone surrogates are refused, naming the file and line."""
    path = Path(path)
    pairs = []
    for where, record in read_jsonl(path, "pairs"):
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not isinstance(record.get("text"), str):
            raise ValueError(f"{where}: expected {{\"image\": PATH, \"text\": CAPTION}}")
        check_keys(record, ("image", "text"), where)
        if not record["image"] or not record["text"].strip():
            raise ValueError(f"{where}: \"image\" and \"text\" must be non-empty strings")
        pairs.append((path.parent / unicode_text(record["image"], where), unicode_text(record["text"], where)))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


class PairData:
    """Captioned pictures in memory: pixels (N, S, S, 3) uint8, ids (N, max_text_len) int64 padded with <pad>."""

    def __init__(self, pairs: list[tuple[Path, str]], vocab: Vocabulary, config: EncoderConfig, root: Path):
        if len(pairs) < 2:
            raise ValueError(f"contrastive training needs at least 2 captioned pictures, found {len(pairs)}")
        size, length = config.vision.image_size, config.text.max_text_len
        self.pixels = read_pictures_uint8([image for image, _ in pairs], size)
        self.ids = tokenize_captions(vocab, [text for _, text in pairs], length, pad_to=length)
        self.pad = vocab.special.pad
        names = [os.path.relpath(image, root) if Path(image).is_relative_to(root) else str(image) for image, _ in pairs]
        digest = hashlib.sha256("\n".join(f"{name}\t{text}" for name, (_, text) in zip(names, pairs)).encode())
        self.identity = {"pairs": len(pairs), "image_size": size, "sha256": digest.hexdigest()[:16]}

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """-> pixels (B, 3, S, S) in [-1, 1], ids (B, T) cut after the longest caption of the batch."""
        index = torch.from_numpy(indices)
        ids = self.ids[index]
        length = int((ids != self.pad).sum(1).max())
        return pixels_from_uint8(self.pixels[index]), ids[:, :length]


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> np.ndarray:
    """Rows of step `step`: positions step*B .. step*B+B-1 of epoch permutations seeded by (seed, epoch)."""
    return walk_rows(step * batch_size, batch_size, count, seed)


# -----------------------------------------------------------------------------
# Optimisation

def learning_rate(config: EncoderConfig, step: int) -> float:
    """lr of optimizer step `step` (0-based): linear warm-up, then cosine down to lr * min_lr_ratio."""
    return Schedule.of(config.train).lr(step, config.train.lr)


def parameter_groups(model: ContrastiveModel, train: EncoderTrainConfig) -> list[dict]:
    """Weight decay on Linear/Conv2d/Embedding weights; none on norms, biases and position tables; the
    log-temperature and bias in a third group, without decay, at lr * scalar_lr_scale."""
    decayed = weight_ids(model, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))
    scalars = [p for p in (model.log_temperature, model.bias) if p.requires_grad]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not s for s in scalars)]
    return [*decay_groups(rest, decayed, train.weight_decay, lr_scale=1.0),
            {"params": scalars, "weight_decay": 0.0, "lr_scale": train.scalar_lr_scale}]


class EncoderTrainer:
    def __init__(self, config: EncoderConfig, world_dir: str | os.PathLike, vocab_dir: str | os.PathLike,
                 out: str | os.PathLike, pairs: str | os.PathLike | None = None, device: str | None = None,
                 progress: Callable[[str], None] | None = None):
        self.world_dir = check_world(world_dir)
        self.vocab = Vocabulary.load(vocab_dir)
        self.config = config.for_vocabulary(self.vocab).validate()
        self.out = Path(out)
        self.run = RunDirectory(self.out)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = progress or (lambda line: None)
        examples = captioned_pairs(self.world_dir, "train") + (read_pairs_file(pairs) if pairs else [])
        self.data = PairData(examples, self.vocab, self.config, self.world_dir)
        torch.manual_seed(self.config.train.seed)  # the initial weights are a function of the seed
        self.model = ContrastiveModel(self.config).to(self.device)
        train = self.config.train
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, train), lr=train.lr,
                                           betas=(train.beta1, train.beta2))
        self.step = 0

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- the loop ---------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the batch of `self.step`; returns (loss, gradient norm before clipping)."""
        train = self.config.train
        torch.manual_seed(train.seed * 1_000_003 + self.step)  # any randomness in a step is a function of the step
        pixels, ids = self.data.batch(batch_indices(self.step, train.batch_size, len(self.data), train.seed))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.step) * group["lr_scale"]
        self.model.train()
        with self._autocast():
            loss = self.model(pixels.to(self.device), ids.to(self.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is not finite at step {self.step + 1}; lower train.lr "
                                     f"(last checkpoint: {self._latest_name()})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        self.optimizer.step()
        return float(loss.detach()), float(norm)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def train(self) -> dict:
        """Train from self.step to train.steps; checkpoints, log lines, and RUN/zero_shot.json at the end."""
        train = self.config.train
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.json", self.config.to_json() + "\n")
        self.vocab.save(self.out / "vocab")
        losses, norms, start, paused, record = [], [], time.perf_counter(), 0.0, {}
        while self.step < train.steps:
            loss, norm = self.train_step()
            losses.append(loss)
            norms.append(norm)
            self.step += 1
            last = self.step == train.steps
            if self.step % train.log_every == 0 or last:
                seconds = time.perf_counter() - start - paused
                record = self._log(losses, norms, seconds)
                losses, norms, start, paused = [], [], time.perf_counter(), 0.0
            pause = time.perf_counter()
            if train.eval_every and self.step % train.eval_every == 0 and not last:
                self._log_zero_shot()
            if self.step % train.checkpoint_every == 0 or last:
                self.save(record.get("loss"))
            paused += time.perf_counter() - pause
        result = zero_shot(self.model, self.vocab, self.world_dir, "heldout", self.device)
        atomic_write_text(self.out / "zero_shot.json", json.dumps({"step": self.step, **result}, indent=2) + "\n")
        return {**record, "zero_shot": result}

    def _log(self, losses: list[float], norms: list[float], seconds: float) -> dict:
        record = {"step": self.step, "loss": round(sum(losses) / len(losses), 6),
                  "temperature": round(float(self.model.clipped_log_temperature().detach().exp()), 4),
                  "bias": round(float(self.model.bias.detach()), 4), "lr": learning_rate(self.config, self.step - 1),
                  "grad_norm": round(norms[-1], 4),
                  "images_per_s": round(len(losses) * self.config.train.batch_size / max(seconds, 1e-9), 1)}
        self.run.append_log(record)
        self.progress(f"step {self.step:6d} loss {record['loss']:.4f} t {record['temperature']:.2f} "
                      f"b {record['bias']:.2f} lr {record['lr']:.2e} {record['images_per_s']:.0f} img/s")
        return record

    def _log_zero_shot(self) -> None:
        result = zero_shot(self.model, self.vocab, self.world_dir, "heldout", self.device)
        self.run.append_log({"step": self.step, "zero_shot": result})
        self.progress(f"step {self.step:6d} zero-shot colour+shape {result['colour_shape']['accuracy']:.3f} "
                      f"(chance {result['colour_shape']['chance']:.3f})")

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _latest_name(self) -> str:
        return latest_text(self.out) or "none"

    def save(self, loss: float | None = None) -> Path:
        tmp = staging_dir(self.out, self.step)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  tmp / "model.safetensors")
        tensors, description = flatten_optimizer(self.optimizer, "optimizer")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(description))
        (tmp / "config.json").write_text(self.config.to_json() + "\n")
        self.vocab.save(tmp / "vocab")
        meta = {"step": self.step, "loss": loss, "vocab_fingerprint": self.vocab.fingerprint,
                "data": self.data.identity, "world": str(self.world_dir.resolve()), "parameters": self.num_parameters,
                "weights_sha256": file_sha256(tmp / "model.safetensors")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return commit_checkpoint(tmp, self.config.train.keep_checkpoints, RESUME_FILES)

    def resume(self) -> bool:
        """Continue from the run's checkpoint (RUN/latest's, or the newest complete one when that is damaged,
        with a message); same model, data, vocabulary and batch order required."""
        directory = resume_checkpoint(self.out, RESUME_FILES, lambda note: self.progress(f"warning: {note}"))
        if directory is None:
            return False
        meta = read_json(directory / "meta.json")
        if meta.get("vocab_fingerprint") != self.vocab.fingerprint:
            raise ValueError(f"--resume of {self.out}: the run was trained with vocabulary "
                             f"{meta.get('vocab_fingerprint')}, --vocab is {self.vocab.fingerprint}; the ids would "
                             "mean different pieces")
        saved = read_encoder_config(directory)
        changed = changed_fields(saved.to_dict(), self.config.to_dict())
        changed = [name for name in changed if name.removeprefix("train.") not in RESUMABLE_CHANGES]
        if changed:
            raise ValueError(f"--resume of {self.out}: the config differs from the run's {directory / 'config.json'} "
                             f"in {changed}; resume with the same settings or use another --out")
        if meta.get("data") != self.data.identity:
            raise ValueError(f"--resume of {self.out}: the training pairs differ from the run's ({meta.get('data')} "
                             f"saved, {self.data.identity} now); use the same --world and --pairs")
        load_weights(self.model, directory / "model.safetensors")
        restore_optimizer(self.optimizer, "optimizer", load_tensors(directory / "optimizer.safetensors"),
                          read_json(directory / "optimizer.json"))
        self.step = int(meta["step"])
        self.run.truncate_log(self.step)  # drop the log lines written after this checkpoint
        return True


# -----------------------------------------------------------------------------
# Zero-shot evaluation

@torch.no_grad()
def _embed(encode: Callable, inputs: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([encode(inputs[i : i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(inputs), batch_size)]) if len(inputs) else torch.zeros(0)


def _classify(images: torch.Tensor, prompts: torch.Tensor, labels: list[int]) -> dict:
    predictions = (images @ prompts.T).argmax(1)
    accuracy = float((predictions == torch.tensor(labels)).float().mean()) if labels else None
    return {"accuracy": accuracy, "chance": 1 / len(prompts), "classes": len(prompts)}


@torch.no_grad()
def zero_shot(model: ContrastiveModel, vocab: Vocabulary, world_dir: str | os.PathLike, split: str = "heldout",
              device: str | torch.device = "cpu") -> dict:
    """Zero-shot accuracy on the split's one-object world pictures (colour+shape, shape, colour; each with its
    chance level 1/classes) and image -> text recall@1 over the split's captions (chance: the expected recall
    of a random caption, ~1/N)."""
    world_dir = check_world(world_dir)
    config = model.config
    if (vocab.image_offset, vocab.special.pad) != (config.text.vocab_size, config.text.pad_id):
        raise ValueError(f"the vocabulary ({vocab.image_offset} text and special ids) is not the one the encoder's "
                         f"text tower was trained with ({config.text.vocab_size})")
    was_training = model.training
    model.eval()
    size, length = config.vision.image_size, config.text.max_text_len

    def text_embeddings(texts: list[str]) -> torch.Tensor:
        return _embed(model.encode_text, tokenize_captions(vocab, texts, length), device)

    scenes = read_scenes(world_dir)
    images = sorted({s["image"] for d in read_documents(world_dir, split) for s in d["segments"] if "image" in s})
    single = [(image, scenes[image].objects[0]) for image in images if len(scenes[image].objects) == 1]
    pictures = _embed(model.encode_image, load_pictures([world_dir / image for image, _ in single], size), device)
    classes = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    result = {"split": split, "pictures": len(single)}
    if single:
        result["colour_shape"] = _classify(
            pictures, text_embeddings([f"{_count_phrase(1, c, s)}." for c, s in classes]),
            [classes.index((obj.colour, obj.shape)) for _, obj in single])
        result["shape"] = _classify(pictures, text_embeddings([f"a {shape}." for shape in SHAPES]),
                                    [SHAPES.index(obj.shape) for _, obj in single])
        result["colour"] = _classify(pictures, text_embeddings([f"something {colour}." for colour in COLOURS]),
                                     [COLOURS.index(obj.colour) for _, obj in single])
    pairs = captioned_pairs(world_dir, split)
    if pairs:
        captions = [text for _, text in pairs]
        found = _embed(model.encode_image, load_pictures([image for image, _ in pairs], size), device)
        best = (F.normalize(found, dim=-1) @ text_embeddings(captions).T).argmax(1).tolist()
        copies = Counter(captions)
        result["retrieval"] = {
            "recall_at_1": sum(captions[j] == captions[i] for i, j in enumerate(best)) / len(pairs),
            "chance": sum(copies[text] for text in captions) / len(pairs) ** 2, "pictures": len(pairs)}
    model.train(was_training)
    return result
