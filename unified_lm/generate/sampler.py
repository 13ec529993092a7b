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
into a preallocated cache (`KVCache`; the unconditional row's restart is `KVCache.restart_row`).

Reading order: `Sampler.generate` is the loop. Each step runs the processors of `processors.py` on the logits
(guidance, the user's processors, the modality mask, repetition penalty, temperature/top-k/top-p), draws with the
token selector, then `_advance` updates each document's `RowState` and asks the stopping rules, and `_decode`
feeds the drawn tokens. `_start` (prompts, prefill) and `_documents` (the results) are the two ends.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from unified_lm.generate.decode_step import StaticDecodeStep
from unified_lm.generate.processors import (
    ClassifierFreeGuidance,
    LogitsProcessor,
    ModalityMask,
    PlainProcessor,
    RepetitionPenalty,
    SamplingFilter,
    StepView,
    StoppingRule,
    TokenSelector,
    allowed_table,
    apply_processors,
    stop_reason,
    stopping_rules,
)
from unified_lm.generate.sampling import Guidance, RowGenerators, SamplingConfig
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


@dataclass
class RowState:
    """One document while it is generated (processors read it as a `RowView`). Its cache rows are
    index + block * B, one per context block: full, [image-only (3way)], [unconditional]."""

    index: int  # its place in the batch
    seed: int
    prompt: list[int]  # its full-context prompt ids
    budget: int  # tokens it may generate
    builder: _DocumentBuilder  # its segments and streaming events
    next_position: list[int]  # per context: the RoPE position its next token takes
    first_slot: list[int]  # per context: the cache slot of its <bos>
    in_image: bool = False
    image_filled: int = 0  # codes drawn in the open picture
    images_made: int = 0  # pictures opened (a prompt that ends in <boi> counts)
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # why it stopped ("eos", "length", "image"); None while it runs


@dataclass
class _Run:
    """What one generate call's steps share."""

    rows: list[RowState]
    guidance: Guidance
    cache: KVCache
    steps: dict[int, StaticDecodeStep]  # static decode steps by row count (static mode)
    logits: torch.Tensor  # (R, V): every cache row's latest logits

    @property
    def contexts(self) -> int:
        return self.guidance.contexts


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
        if self.image_grid is not None:
            model.config.check_picture_grid(*self.image_grid, "the sampler's picture grid")
        self.device = next(model.parameters()).device
        self.static = compile or (self.device.type == "cuda" if static is None else static)
        self.compile = compile
        self.stats = SamplerStats()
        self._allowed = allowed_table(vocab).to(self.device)  # the modality mask's states

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
    @torch.no_grad()
    def generate(self, prompts: list[Prompt], config: SamplingConfig,
                 on_event: Callable[[SampleEvent], None] | None = None,
                 logits_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 trace: SamplerTrace | None = None,
                 processors: Sequence[LogitsProcessor] = ()) -> list[SampledDocument]:
        """Sample one document per prompt, all in one batch.

        logits_processor: (B, V) -> (B, V); processors: `LogitsProcessor`s, (logits (B, V), step `StepView`) ->
        (B, V). Both change the guided logits (in that order) before the modality mask, so they can never make
        a forbidden token possible (see `unified_lm.generate.processors`)."""
        self._check(prompts, config)
        run = self._start(prompts, config, on_event)
        guide, rules, select = self._parts(config, run, logits_processor, processors)
        stops = stopping_rules(config.mode, self.vocab.special)
        start = time.perf_counter()
        while True:
            step = StepView.of(run.logits, run.rows)
            guided = apply_processors(guide, run.logits[: len(run.rows)], step)
            drawn = select(apply_processors(rules, guided, step), step)
            if trace is not None:
                self._record(trace, run, guided, drawn)
            feed = self._advance(run, drawn, stops)
            if all(row.finish is not None for row in run.rows):
                break
            self.stats.decode_steps += 1
            run.logits = self._decode(run, feed)
        self._sync()
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.tokens += sum(len(row.generated) for row in run.rows)
        return self._documents(prompts, run, on_event)

    def _start(self, prompts: list[Prompt], config: SamplingConfig,
               on_event: Callable[[SampleEvent], None] | None) -> _Run:
        """Encode the prompts, prefill every cache row, and set up each document's state."""
        special, batch = self.vocab.special, len(prompts)
        full = [self.encode_prompt(p, config.mode) for p in prompts]
        budgets = self._budgets(full, config)
        guidance = config.guidance if config.mode in ("interleaved", "image") else Guidance("none")
        contexts = self._contexts(full, guidance)
        cache, steps, logits = self._prefill(prompts, contexts, max(budgets))
        width = max(len(ids) for ids in contexts)
        rows = []
        for index, ids in enumerate(full):
            seed = prompts[index].seed if prompts[index].seed is not None else config.seed + index
            own = contexts[index::batch]  # this document's cache rows, one per context
            row = RowState(index, seed, ids, budgets[index], _DocumentBuilder(self.vocab, self.image_grid, index, on_event),
                           next_position=[len(c) for c in own], first_slot=[width - len(c) for c in own])
            if ids[-1] == special.boi:  # image mode: the prompt opened the picture
                row.in_image, row.images_made = True, 1
                row.builder.start_image()
            rows.append(row)
        return _Run(rows, guidance, cache, steps, logits)

    def _budgets(self, full: list[list[int]], config: SamplingConfig) -> list[int]:
        """Tokens each document may generate: max_new_tokens, or what the model's context leaves after its prompt."""
        context, budgets = self.model.config.max_seq_len, []
        for number, ids in enumerate(full):
            if len(ids) >= context:
                raise ValueError(f"prompt {number} is {len(ids)} tokens; the model's context is {context} tokens")
            budgets.append(min(config.max_new_tokens, context - len(ids)))
            if config.mode == "image" and budgets[-1] < self.grid_tokens + 1:
                raise ValueError(f"prompt {number}: a picture needs {self.grid_tokens + 1} more tokens (codes + <eoi>), "
                                 f"but only {budgets[-1]} fit (max_new_tokens {config.max_new_tokens}, context {context})")
        return budgets

    def _contexts(self, full: list[list[int]], guidance: Guidance) -> list[list[int]]:
        """Every cache row's prompt, B rows per context: the documents, [3way: the documents without their text],
        [the unconditional context: <bos>, and <boi> when the prompt opened a picture]."""
        special = self.vocab.special
        rows = list(full)
        if guidance.mode == "3way":
            rows += [[special.bos] + [t for t in ids[1:] if self.vocab.in_picture(t)] for ids in full]
        if guidance.mode != "none":
            rows += [[special.bos] + ([special.boi] if ids[-1] == special.boi else []) for ids in full]
        return rows

    def _prefill(self, prompts: list[Prompt], contexts: list[list[int]],
                 new_tokens: int) -> tuple[KVCache, dict[int, StaticDecodeStep], torch.Tensor]:
        """One pass over the left-padded rows into a new cache with room for `new_tokens` more slots; every row's
        positions count from 0 at its first real token. Returns the cache, the static decode steps by row count
        (static mode) and the (R, V) logits of each row's last token."""
        special, model = self.vocab.special, self.model
        width, total = max(len(ids) for ids in contexts), len(contexts)
        tokens = torch.full((total, width), special.pad, dtype=torch.long)
        valid = torch.zeros(total, width, dtype=torch.bool)
        for row, ids in enumerate(contexts):
            tokens[row, width - len(ids):] = torch.tensor(ids)
            valid[row, width - len(ids):] = True
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        dtype = next(model.parameters()).dtype
        cache = KVCache.allocate(model.config, total, width + new_tokens, self.device, dtype)
        steps = {}
        if self.static:  # before the prefill: warming a step up writes slot 0, which the prefill overwrites
            for count in {total, len(prompts)}:
                steps[count] = StaticDecodeStep(model, cache, count, compile=self.compile)
        start = time.perf_counter()
        splice_mask, splice_embeddings = self._continuous_splice(prompts, tokens.to(self.device))
        logits = model.decode(tokens.to(self.device), cache, positions.to(self.device), valid.to(self.device),
                              last_only=True, splice_mask=splice_mask, splice_embeddings=splice_embeddings,
                              code_positions=self.vocab.code_positions(tokens).to(self.device))[:, 0]
        self._sync()
        self.stats.prefill_seconds += time.perf_counter() - start
        return cache, steps, logits

    def _parts(self, config: SamplingConfig, run: _Run, logits_processor: Callable | None,
               processors: Sequence[LogitsProcessor]) -> tuple[list, list, TokenSelector]:
        """This call's guidance processors, rule processors and token selector (module docstring of processors)."""
        guide: list[LogitsProcessor] = [ClassifierFreeGuidance(run.guidance)]
        if logits_processor is not None:
            guide.append(PlainProcessor(logits_processor))
        guide += processors
        max_images = {"interleaved": config.max_images, "image": 1}.get(config.mode, 0)
        rules: list[LogitsProcessor] = [ModalityMask(self._allowed, self.grid_tokens, max_images)]
        if config.text.repetition_penalty != 1.0:
            rules.append(RepetitionPenalty(self.vocab, config.text.repetition_penalty, self.device))
        rules.append(SamplingFilter(config.text, config.image, self.device))
        generators = RowGenerators([row.seed for row in run.rows], self.device)
        return guide, rules, TokenSelector(generators, config.text, config.image, self.device)

    def _record(self, trace: SamplerTrace, run: _Run, guided: torch.Tensor, drawn: list[int]) -> None:
        trace.raw.append(run.logits.float().cpu())
        trace.guided.append(guided.float().cpu())
        trace.in_image.append([row.in_image for row in run.rows])
        trace.tokens.append([t if row.finish is None else None for row, t in zip(run.rows, drawn)])

    def _advance(self, run: _Run, drawn: list[int], stops: list[StoppingRule]) -> list[tuple[int, int] | None]:
        """Give each running document its drawn token (state, stream, stopping rules). Returns what each cache
        row takes next: (token, its place in its picture or -1), or None for a padding slot."""
        batch, vocab = len(run.rows), self.vocab
        feed: list[tuple[int, int] | None] = [None] * (batch * run.contexts)
        for row, token in zip(run.rows, drawn):
            if row.finish is not None:
                continue
            self._accept(row, token)
            row.finish = stop_reason(stops, row, token)
            if row.finish is not None:
                row.builder.finish()
                continue
            code_position = row.image_filled - 1 if row.in_image and vocab.is_image(token) else -1
            for block in range(run.contexts if vocab.in_picture(token) else 1):  # guidance rows: pictures only
                feed[block * batch + row.index] = (token, code_position)
            if token == vocab.special.boi and run.contexts > 1:  # the unconditional context restarts: [<bos>, <boi>]
                unconditional = run.contexts - 1
                run.cache.restart_row(unconditional * batch + row.index, row.first_slot[unconditional])
                row.next_position[unconditional] = 1
        return feed

    def _accept(self, row: RowState, token: int) -> None:
        """The state machine's bookkeeping for one drawn token."""
        special = self.vocab.special
        row.generated.append(token)
        row.builder.add(token)
        if token == special.boi:
            row.in_image, row.image_filled = True, 0
            row.images_made += 1
        elif token == special.eoi:
            row.in_image = False
        elif row.in_image:
            row.image_filled += 1

    def _decode(self, run: _Run, feed: list[tuple[int, int] | None]) -> torch.Tensor:
        """One token into each cache row that has one -> (R, V) logits. While no guidance row takes a token,
        only the first B rows run (a view of the cache) and the others keep their last logits."""
        batch, total = len(run.rows), len(feed)
        count = total if any(f is not None for f in feed[batch:]) else batch
        cache_rows = [(row, block) for block in range(run.contexts) for row in run.rows][:count]
        feed = feed[:count]
        tokens = torch.tensor([self.vocab.special.pad if f is None else f[0] for f in feed])[:, None]
        positions = torch.tensor([row.next_position[block] for row, block in cache_rows])[:, None]
        valid = torch.tensor([f is not None for f in feed])[:, None]
        code_positions = torch.tensor([-1 if f is None else f[1] for f in feed])[:, None]
        inputs = [t.to(self.device) for t in (tokens, positions, valid, code_positions)]
        if self.static:
            logits = run.steps[count](*inputs, run.cache.length)
        else:
            logits = self.model.decode(inputs[0], run.cache.head(count), inputs[1], inputs[2],
                                       code_positions=inputs[3])[:, 0]
        run.cache.advance()
        for (row, block), taken in zip(cache_rows, feed):
            row.next_position[block] += taken is not None
        if count == total:
            return logits
        merged = run.logits.clone()
        merged[:count] = logits
        return merged

    def _documents(self, prompts: list[Prompt], run: _Run,
                   on_event: Callable[[SampleEvent], None] | None) -> list[SampledDocument]:
        documents = []
        for row, prompt in zip(run.rows, prompts):
            segments = split_segments(row.prompt, self.vocab, self.image_grid)
            continuous = iter(s for s in prompt.segments if isinstance(s, ContinuousPicture))
            for segment in segments:  # continuous pictures keep their pixels (they have no codes to decode)
                if segment.kind == "image" and segment.codes is None:
                    segment.pixels = to_uint8(next(continuous).pixels)
            document = SampledDocument(row.index, row.seed, segments, row.builder.segments, row.generated,
                                       row.finish, len(row.prompt))
            documents.append(document)
            if on_event is not None:
                on_event(SampleEvent(row=row.index, kind="done", document=document))
        return documents

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
