"""Interleaved text + picture generation from the unified model: KV-cached decoding under a modality state machine.

Each document row is in one of two modes:
- text:  may emit text pieces, <eos>, or <boi>. <boi> is allowed only while the document may hold another picture
         (`max_images`) and the rest of its token budget holds a whole one (<boi> + grid codes + <eoi>).
- image: may emit only image codes, exactly grid_h * grid_w of them; then <eoi> is forced and text mode resumes.
Every other id (<bos>, <pad>, <unk>, the `<image>` placeholder, <eoi> outside a picture) is never sampled.

Modes: `interleaved` (text and pictures), `text` (no pictures), `image` (the prompt is followed by <boi>: exactly
one picture, then the document ends) and `understanding` (prompts that contain pictures, answered in text).

Classifier-free guidance for picture codes runs its extra contexts as extra rows of the same batch:
  rows [0, B)       the full documents
  rows [B, 2B)      3way: the documents with every text token removed (Chameleon's image-only context)
  last B rows       the unconditional context [<bos>, <boi>], restarted at every picture
The guidance rows take only picture tokens (<boi>, codes, <eoi>); while no row is drawing a picture, only the
first B rows are decoded (a view of the same cache), so guidance costs nothing during text.

Decoding never recomputes the prefix: one prefill over the left-padded prompts, then one token per row per step
into a preallocated cache (`KVCache`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from unified_lm.generate.decode_step import StaticDecodeStep
from unified_lm.generate.sampling import (
    Guidance,
    RowGenerators,
    SamplingConfig,
    apply_repetition_penalty,
    draw,
    filter_logits,
    guided_logits,
)
from unified_lm.generate.segments import ContinuousPicture, Prompt, SampledDocument, Segment
from unified_lm.model.transformer import KVCache, UnifiedTransformer
from unified_lm.tokens.vocab import Vocabulary
from vqtok.images import to_uint8


@dataclass
class SampleEvent:
    """Streaming: "token" for every generated token, "segment" when a text run or a picture is complete, "done"
    when a document ends. `text` holds the characters a text token added."""

    row: int
    kind: str
    token: int | None = None
    modality: str = "text"
    text: str = ""
    segment: Segment | None = None
    document: SampledDocument | None = None


@dataclass
class SamplerTrace:
    """Per-step record for tests and debugging: raw logits of every row (R, V), the guided logits that were
    sampled from (B, V, before masking), which rows were in a picture, and the tokens drawn."""

    raw: list[torch.Tensor] = field(default_factory=list)
    guided: list[torch.Tensor] = field(default_factory=list)
    in_image: list[list[bool]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)


@dataclass
class SamplerStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    tokens: int = 0  # generated tokens over all documents

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.decode_seconds, 1e-9)


def split_segments(tokens: list[int], vocab: Vocabulary, grid: tuple[int, int] | None) -> list[Segment]:
    """Ids -> text runs and pictures. A picture is the codes between <boi> and <eoi>, shaped to `grid` when it
    holds grid_h * grid_w codes (else left flat, as a (1, n) array); specials are dropped."""
    builder = _DocumentBuilder(vocab, grid, row=0, on_event=None)
    for token in tokens:
        builder.add(token)
    builder.finish()
    return builder.segments


class _DocumentBuilder:
    """Turns one row's tokens into segments as they arrive, emitting streaming events."""

    def __init__(self, vocab: Vocabulary, grid: tuple[int, int] | None, row: int,
                 on_event: Callable[[SampleEvent], None] | None):
        self.vocab, self.grid, self.row, self.on_event = vocab, grid, row, on_event
        self.segments: list[Segment] = []
        self.text_tokens: list[int] = []
        self.text_so_far = ""
        self.image_tokens: list[int] | None = None
        self.continuous = False  # the open picture is a continuous one (placeholders, no codes)

    def _emit(self, **event) -> None:
        if self.on_event is not None:
            self.on_event(SampleEvent(row=self.row, **event))

    def add(self, token: int) -> None:
        special, vocab = self.vocab.special, self.vocab
        if token == special.boi:
            self._close_text()
            self.image_tokens = []
            self._emit(kind="token", token=token, modality="image")
        elif token == special.eoi:
            self._emit(kind="token", token=token, modality="image")
            self._close_image()
        elif self.image_tokens is not None and vocab.is_image(token):
            self.image_tokens.append(token)
            self._emit(kind="token", token=token, modality="image")
        elif self.image_tokens is not None and token == special.image:  # a continuous picture's placeholder
            self.continuous = True
        elif vocab.is_text(token):
            self.text_tokens.append(token)
            text = vocab.decode_text(self.text_tokens)
            added, self.text_so_far = text[len(self.text_so_far):] if text.startswith(self.text_so_far) else text, text
            self._emit(kind="token", token=token, modality="text", text=added)
        else:  # <eos> and other specials end the current text run
            self._emit(kind="token", token=token, modality="text")
            self._close_text()

    def start_image(self) -> None:
        """The prompt ended with <boi>: generation starts inside a picture."""
        self.image_tokens = []

    def _close_text(self) -> None:
        if self.text_tokens:
            segment = Segment("text", self.text_tokens, self.vocab.decode_text(self.text_tokens))
            self.segments.append(segment)
            self._emit(kind="segment", modality="text", segment=segment)
        self.text_tokens, self.text_so_far = [], ""

    def _close_image(self) -> None:
        tokens, self.image_tokens = self.image_tokens or [], None
        if self.continuous:
            self.continuous = False
            self.segments.append(Segment("image"))
            return
        codes = self.vocab.image_codes(np.asarray(tokens, dtype=np.int64))
        if self.grid is not None and codes.size == self.grid[0] * self.grid[1]:
            codes = codes.reshape(self.grid)
        else:
            codes = codes.reshape(1, -1)
        segment = Segment("image", tokens, codes=codes)
        self.segments.append(segment)
        self._emit(kind="segment", modality="image", segment=segment)

    def finish(self) -> None:
        self._close_text()
        if self.image_tokens:  # an unfinished picture (only when decoding arbitrary ids, never from the sampler)
            self._close_image()


class Sampler:
    """Generates documents from a unified model. `image_grid` (h, w) is the picture size the model draws (from
    the checkpoint's training data, `LoadedModel.image_grids`); None disables pictures.

    static: decode through `StaticDecodeStep` (fixed shapes, replayed as a CUDA graph on GPU); default: on CUDA
    only. compile: run that step through torch.compile (implies static)."""

    def __init__(self, model: UnifiedTransformer, vocab: Vocabulary, image_grid: tuple[int, int] | None,
                 static: bool | None = None, compile: bool = False):
        if model.config.vocab_size != vocab.size:
            raise ValueError(f"model vocab_size {model.config.vocab_size} does not match the vocabulary ({vocab.size} ids)")
        self.model, self.vocab = model.eval(), vocab
        self.image_grid = tuple(image_grid) if image_grid is not None else None
        positions = model.config.image_positions
        if positions and self.image_grid is not None and self.grid_tokens > positions:
            raise ValueError(f"a {self.image_grid[0]}x{self.image_grid[1]} picture has {self.grid_tokens} codes, but the "
                             f"model has image position embeddings for {positions}")
        self.device = next(model.parameters()).device
        self.static = compile or (self.device.type == "cuda" if static is None else static)
        self.compile = compile
        self.stats = SamplerStats()
        special = vocab.special
        text = torch.from_numpy(vocab.text_mask)
        if vocab.text.kind == "sentencepiece":
            text[0] = False  # sentencepiece's <unk>: byte fallback never needs it
        text[special.eos] = True
        picture = torch.from_numpy(vocab.image_mask)
        only_eoi = torch.zeros(vocab.size, dtype=torch.bool)
        only_eoi[special.eoi] = True
        text_or_picture = text.clone()
        text_or_picture[special.boi] = True
        self._allowed = torch.stack([text, picture, only_eoi, text_or_picture]).to(self.device)  # see _state_index

    @property
    def grid_tokens(self) -> int:
        return 0 if self.image_grid is None else self.image_grid[0] * self.image_grid[1]

    # -- prompts --------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, mode: str) -> list[int]:
        """<bos>, then each segment (text pieces, <boi> codes <eoi>, or <boi> <image>... <eoi> for a continuous
        picture); image mode appends <boi>."""
        special = self.vocab.special
        ids = [special.bos]
        for number, segment in enumerate(prompt.segments):
            if isinstance(segment, str):
                ids += self.vocab.encode_text(segment)
            elif isinstance(segment, ContinuousPicture):
                ids += [special.boi] + [special.image] * self.placeholders(segment, number) + [special.eoi]
            else:
                codes = np.asarray(segment)
                if codes.ndim != 2:
                    raise ValueError(f"prompt segment {number}: a picture must be an (h, w) array of codes, got shape {codes.shape}")
                ids += self.vocab.image_ids(codes).tolist()
        if mode == "image":
            ids.append(self.vocab.special.boi)
        return ids

    def placeholders(self, picture: ContinuousPicture, number: int) -> int:
        adapter = self.model.picture_adapter
        if adapter is None:
            raise ValueError(f"prompt segment {number}: a continuous picture needs a model with a picture encoder "
                             "(trained with train.encoder_run); this one reads pictures as codes only")
        if picture.pixels.ndim != 3 or picture.pixels.shape[0] != 3:
            raise ValueError(f"prompt segment {number}: continuous picture pixels must be (3, S, S), got "
                             f"{tuple(picture.pixels.shape)}")
        return adapter.placeholders(picture.pixels.shape[-1])

    def _continuous_splice(self, prompts: list[Prompt], tokens: torch.Tensor):
        """(splice_mask, embeddings) for the continuous prompt pictures of the first len(prompts) rows, or
        (None, None): every placeholder gets the adapter's feature for its picture and patch, in row order."""
        pictures = [s.pixels for p in prompts for s in p.segments if isinstance(s, ContinuousPicture)]
        if not pictures:
            return None, None
        splice_mask = tokens == self.vocab.special.image
        dtype = next(self.model.parameters()).dtype
        features = torch.cat([self.model.picture_adapter(picture[None].to(self.device, dtype))[0]
                              for picture in pictures])
        if features.shape[0] != int(splice_mask.sum()):
            raise ValueError(f"{int(splice_mask.sum())} <image> placeholders in the prompts but {features.shape[0]} "
                             "picture features; a prompt's text must not contain the placeholder token")
        return splice_mask, features

    def _check(self, prompts: list[Prompt], config: SamplingConfig) -> None:
        config.validate()
        if not prompts:
            raise ValueError("no prompts to sample from")
        if config.mode in ("interleaved", "image") and self.image_grid is None:
            raise ValueError(f"mode {config.mode!r} draws pictures, but the picture grid is unknown (give image_grid / "
                             "--image-grid HxW; checkpoints record it from their training data)")
        for number, prompt in enumerate(prompts):
            has_picture = any(not isinstance(s, str) for s in prompt.segments)
            if config.guidance.mode != "none" and config.mode in ("interleaved", "image") and any(
                    isinstance(s, ContinuousPicture) for s in prompt.segments):
                raise ValueError(f"prompt {number}: classifier-free guidance contexts hold picture codes; continuous "
                                 "prompt pictures work without guidance (--cfg none)")
            if config.mode == "understanding" and not has_picture:
                raise ValueError(f"prompt {number}: mode 'understanding' answers questions about pictures; the prompt "
                                 "holds none (give --image PATH)")

    # -- generation -----------------------------------------------------------------------------------------------
    # generate is long (~180 lines): one loop over parallel per-row lists (finish, in_image, image_filled, ...).
    # Issue 18 rebuilds it as a per-row state dataclass with logits processors around a small loop; it is not
    # split here so that rewrite starts from one piece rather than from fragments sharing those lists.
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], config: SamplingConfig,
                 on_event: Callable[[SampleEvent], None] | None = None,
                 logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 trace: SamplerTrace | None = None) -> list[SampledDocument]:
        """Sample one document per prompt, all in one batch. `logits_processor` (B, V) -> (B, V) may change the
        (guided) logits before the modality mask; it can never make a forbidden token possible."""
        self._check(prompts, config)
        vocab, special, model = self.vocab, self.vocab.special, self.model
        mode, grid_tokens = config.mode, self.grid_tokens
        batch = len(prompts)
        full = [self.encode_prompt(p, mode) for p in prompts]
        context = model.config.max_seq_len
        budgets = []
        for number, ids in enumerate(full):
            if len(ids) >= context:
                raise ValueError(f"prompt {number} is {len(ids)} tokens; the model's context is {context} tokens")
            budgets.append(min(config.max_new_tokens, context - len(ids)))
            if mode == "image" and budgets[-1] < grid_tokens + 1:
                raise ValueError(f"prompt {number}: a picture needs {grid_tokens + 1} more tokens (codes + <eoi>), but "
                                 f"only {budgets[-1]} fit (max_new_tokens {config.max_new_tokens}, context {context})")
        max_images = {"interleaved": config.max_images, "image": 1}.get(mode, 0)
        guidance = config.guidance if mode in ("interleaved", "image") else Guidance("none")
        contexts = guidance.contexts
        starts_in_image = [ids[-1] == special.boi for ids in full]
        rows = list(full)
        if guidance.mode == "3way":  # text removed, pictures kept
            rows += [[special.bos] + [t for t in ids[1:] if vocab.in_picture(t)] for ids in full]
        if guidance.mode != "none":
            rows += [[special.bos] + ([special.boi] if inside else []) for inside in starts_in_image]

        # prefill: left-padded rows, every row's positions counting from 0 at its first real token
        width = max(len(ids) for ids in rows)
        total_rows = len(rows)
        tokens = torch.full((total_rows, width), special.pad, dtype=torch.long)
        valid = torch.zeros(total_rows, width, dtype=torch.bool)
        for row, ids in enumerate(rows):
            tokens[row, width - len(ids):] = torch.tensor(ids)
            valid[row, width - len(ids):] = True
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        dtype = next(model.parameters()).dtype
        cache = KVCache.allocate(model.config, total_rows, width + max(budgets), self.device, dtype)
        steps = {}
        if self.static:  # before the prefill: warming a step up writes slot 0, which the prefill overwrites
            for count in {total_rows, batch}:
                steps[count] = StaticDecodeStep(model, cache, count, compile=self.compile)
        start = time.perf_counter()
        splice_mask, splice_embeddings = self._continuous_splice(prompts, tokens.to(self.device))
        logits = model.decode(tokens.to(self.device), cache, positions.to(self.device), valid.to(self.device),
                              last_only=True, splice_mask=splice_mask, splice_embeddings=splice_embeddings,
                              code_positions=vocab.code_positions(tokens).to(self.device))[:, 0]
        self._sync()
        self.stats.prefill_seconds += time.perf_counter() - start
        next_position = [len(ids) for ids in rows]
        first_slot = [width - len(ids) for ids in rows]  # where each row's <bos> sits in the cache

        # per-document state (host side: the sampled ids come back once per step anyway)
        seeds = [p.seed if p.seed is not None else config.seed + i for i, p in enumerate(prompts)]
        generators = RowGenerators(seeds, self.device)
        in_image = list(starts_in_image)
        image_filled = [0] * batch
        images_made = [int(x) for x in starts_in_image]
        generated: list[list[int]] = [[] for _ in range(batch)]
        finish: list[str | None] = [None] * batch
        builders = [_DocumentBuilder(vocab, self.image_grid, row, on_event) for row in range(batch)]
        for builder, inside in zip(builders, starts_in_image):
            if inside:
                builder.start_image()
        settings = self._row_settings(config)
        penalise = config.text.repetition_penalty != 1.0
        seen = None
        if penalise:
            seen = torch.zeros(batch, vocab.size, dtype=torch.bool, device=self.device)
            for row, ids in enumerate(full):
                text_ids = [t for t in ids if vocab.is_text(t)]
                seen[row, text_ids] = True

        start = time.perf_counter()
        while True:
            state = [self._state_index(in_image[r], image_filled[r], images_made[r], max_images, budgets[r] - len(generated[r]))
                     for r in range(batch)]
            image_rows = torch.tensor(in_image, device=self.device)
            if contexts > 1 and any(in_image):
                mixed = torch.where(image_rows[:, None], guided_logits(logits, guidance), logits[:batch])
            else:
                mixed = logits[:batch]
            if logits_processor is not None:
                mixed = logits_processor(mixed)
            allowed = self._allowed[torch.tensor(state, device=self.device)]
            masked = mixed.masked_fill(~allowed, float("-inf"))
            if penalise:  # text rows only
                penalty = torch.where(image_rows, torch.ones_like(settings["penalty"]), settings["penalty"])
                masked = apply_repetition_penalty(masked, seen, penalty)
            temperature = torch.where(image_rows, settings["image_temperature"], settings["text_temperature"])
            top_k = torch.where(image_rows, settings["image_top_k"], settings["text_top_k"])
            top_p = torch.where(image_rows, settings["image_top_p"], settings["text_top_p"])
            filtered = filter_logits(masked, temperature, top_k, top_p)
            noise = generators.exponential(vocab.size)
            drawn = draw(filtered, noise, temperature == 0).tolist()
            if trace is not None:
                trace.raw.append(logits.float().cpu())
                trace.guided.append(mixed.float().cpu())
                trace.in_image.append(list(in_image))
                trace.tokens.append([t if finish[r] is None else None for r, t in enumerate(drawn)])

            feed = [None] * total_rows  # the token each row takes this step (None: a padding slot)
            feed_code_position = [-1] * total_rows  # its place in its picture when it is an image code
            for row in range(batch):
                if finish[row] is not None:
                    continue
                token = drawn[row]
                generated[row].append(token)
                builders[row].add(token)
                if token == special.boi:
                    in_image[row], image_filled[row] = True, 0
                    images_made[row] += 1
                elif token == special.eoi:
                    in_image[row] = False
                elif in_image[row]:
                    image_filled[row] += 1
                elif penalise and vocab.is_text(token):
                    seen[row, token] = True
                if token == special.eos:
                    finish[row] = "eos"
                elif mode == "image" and token == special.eoi:
                    finish[row] = "image"
                elif len(generated[row]) >= budgets[row]:
                    finish[row] = "length"
                if finish[row] is not None:
                    builders[row].finish()
                    continue
                feed[row] = token
                if in_image[row] and vocab.is_image(token):
                    feed_code_position[row] = image_filled[row] - 1
                if contexts > 1 and vocab.in_picture(token):
                    for block in range(1, contexts):
                        feed[block * batch + row] = token
                        feed_code_position[block * batch + row] = feed_code_position[row]
                    if token == special.boi:  # the unconditional context restarts at every picture: [<bos>, <boi>]
                        uncond = (contexts - 1) * batch + row
                        cache.key_valid[uncond, : cache.length] = False
                        cache.key_valid[uncond, first_slot[uncond]] = True
                        next_position[uncond] = 1
            if all(f is not None for f in finish):
                break
            self.stats.decode_steps += 1
            run_rows = total_rows if any(f is not None for f in feed[batch:]) else batch
            step_tokens = torch.tensor([special.pad if f is None else f for f in feed[:run_rows]])[:, None]
            step_valid = torch.tensor([f is not None for f in feed[:run_rows]])[:, None]
            step_positions = torch.tensor(next_position[:run_rows])[:, None]
            step_code_positions = torch.tensor(feed_code_position[:run_rows])[:, None]
            step_inputs = tuple(t.to(self.device) for t in (step_tokens, step_positions, step_valid, step_code_positions))
            if self.static:
                step_logits = steps[run_rows](*step_inputs, cache.length)
                cache.length += 1
            else:
                view = cache if run_rows == total_rows else cache.head(run_rows)
                step_logits = model.decode(step_inputs[0], view, step_inputs[1], step_inputs[2],
                                           code_positions=step_inputs[3])[:, 0]
                cache.length = view.length
            if run_rows == total_rows:
                logits = step_logits
            else:
                logits = logits.clone()
                logits[:run_rows] = step_logits
            for row in range(run_rows):
                next_position[row] += feed[row] is not None
        self._sync()
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.tokens += sum(len(g) for g in generated)

        documents = []
        for row in range(batch):
            prompt = split_segments(full[row], vocab, self.image_grid)
            continuous = iter(s for s in prompts[row].segments if isinstance(s, ContinuousPicture))
            for segment in prompt:  # continuous pictures keep their pixels (they have no codes to decode)
                if segment.kind == "image" and segment.codes is None:
                    segment.pixels = to_uint8(next(continuous).pixels)
            document = SampledDocument(row, seeds[row], prompt,
                                       builders[row].segments, generated[row], finish[row], len(full[row]))
            documents.append(document)
            if on_event is not None:
                on_event(SampleEvent(row=row, kind="done", document=document))
        return documents

    def _state_index(self, in_image: bool, image_filled: int, images_made: int, max_images: int, remaining: int) -> int:
        """Row of `self._allowed`: 0 text, 1 picture codes, 2 forced <eoi>, 3 text that may also open a picture."""
        if in_image:
            return 2 if image_filled >= self.grid_tokens else 1
        fits = remaining >= self.grid_tokens + 2  # <boi> + codes + <eoi>
        return 3 if images_made < max_images and fits else 0

    def _row_settings(self, config: SamplingConfig) -> dict[str, torch.Tensor]:
        def full(value, dtype=torch.float32):
            return torch.full((1,), value, dtype=dtype, device=self.device)

        return {"text_temperature": full(config.text.temperature), "image_temperature": full(config.image.temperature),
                "text_top_k": full(config.text.top_k, torch.long), "image_top_k": full(config.image.top_k, torch.long),
                "text_top_p": full(config.text.top_p), "image_top_p": full(config.image.top_p),
                "penalty": full(config.text.repetition_penalty)}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
