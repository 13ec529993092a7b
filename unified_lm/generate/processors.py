"""The parts of one sampler step: logits processors, the token selector and the stopping rules.

A step of `Sampler.generate` starts from the (B, V) logits of the B documents' full-context rows and runs
  guidance   ClassifierFreeGuidance (picture rows mix in their guidance contexts), then the user's processors
             (`logits_processor=`, then `processors=`): the "guided" logits that `SamplerTrace` records;
  rules      ModalityMask (the text/picture state machine), RepetitionPenalty (text rows), SamplingFilter
             (temperature, top-k, top-p, each with the row's modality's settings);
then TokenSelector draws one token per row, and the stopping rules say which documents are complete. The order
is fixed (outputs depend on it); the user's processors come before the mask, so they can make a token more or
less likely but never possible where the state machine forbids it.

A processor is any callable (logits (B, V) fp32, step: StepView) -> (B, V) logits. It reads the step and never
writes it, and returns new logits rather than editing its input (the trace may hold that tensor). Processors
that keep state (RepetitionPenalty) are built per `generate` call.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from unified_lm.generate.sampling import (
    Guidance,
    ModalitySampling,
    RowGenerators,
    apply_repetition_penalty,
    draw,
    filter_logits,
    guided_logits,
)
from unified_lm.tokens.vocab import SpecialIds, Vocabulary


class RowView(Protocol):
    """What processors and stopping rules read of one document (the sampler's `RowState`)."""

    prompt: list[int]  # its full-context prompt ids
    generated: list[int]  # the ids it generated so far
    in_image: bool  # drawing a picture
    image_filled: int  # codes drawn in the open picture
    images_made: int  # pictures opened so far (a prompt that ends in <boi> counts)
    budget: int  # tokens it may generate in all


@dataclass(frozen=True)
class StepView:
    """One step as processors see it. raw: (R, V) fp32 logits of every cache row, R = B * contexts, block b
    (rows [b*B, (b+1)*B)) being context b: full, [image-only (3way)], [unconditional]; a guidance block is
    current only for the rows drawing a picture. in_image: (B,) bool on the logits' device. rows: the B
    documents, in batch order."""

    raw: torch.Tensor
    in_image: torch.Tensor
    rows: Sequence[RowView]

    @classmethod
    def of(cls, raw: torch.Tensor, rows: Sequence[RowView]) -> StepView:
        return cls(raw, torch.tensor([row.in_image for row in rows], device=raw.device), rows)

    @property
    def any_image(self) -> bool:
        """Some row is drawing a picture (read on the host: no device sync)."""
        return any(row.in_image for row in self.rows)


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor, step: StepView) -> torch.Tensor: ...


def apply_processors(processors: Sequence[LogitsProcessor], logits: torch.Tensor, step: StepView) -> torch.Tensor:
    for processor in processors:
        logits = processor(logits, step)
    return logits


# -- guidance stage -----------------------------------------------------------------------------------------------
class ClassifierFreeGuidance:
    """Picture rows take the guided mix of their contexts (`guided_logits`); text rows keep their logits. The
    input is the full-context block; the guidance blocks come from `step.raw`."""

    def __init__(self, guidance: Guidance):
        self.guidance = guidance

    def __call__(self, logits: torch.Tensor, step: StepView) -> torch.Tensor:
        if self.guidance.mode == "none" or not step.any_image:  # guidance rows are stale while no row draws
            return logits
        # guidance runs first, so its input is normally step.raw's first block itself: mix step.raw without a copy
        same = logits.data_ptr() == step.raw.data_ptr()
        every_context = step.raw if same else torch.cat([logits, step.raw[logits.shape[0]:]])
        return torch.where(step.in_image[:, None], guided_logits(every_context, self.guidance), logits)


class PlainProcessor:
    """A processor that reads only the logits: (B, V) -> (B, V) (what `generate(logits_processor=)` takes)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        self.function = function

    def __call__(self, logits: torch.Tensor, step: StepView) -> torch.Tensor:
        return self.function(logits)


# -- rule stage ---------------------------------------------------------------------------------------------------
TEXT, CODES, EOI, TEXT_OR_PICTURE = range(4)  # states of the modality state machine: rows of `allowed_table`


def allowed_table(vocab: Vocabulary) -> torch.Tensor:
    """(4, V) bool: the ids each state allows. TEXT: text pieces and <eos>; CODES: image codes; EOI: only <eoi>
    (the picture is full); TEXT_OR_PICTURE: TEXT plus <boi>. Every other id is never drawn."""
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
    return torch.stack([text, picture, only_eoi, text_or_picture])


class ModalityMask:
    """Forbidden ids get -inf: a picture takes exactly `grid_tokens` codes and then <eoi>; <boi> is allowed only
    while the document may hold another picture and its budget holds a whole one (<boi>, codes, <eoi>).
    allowed: (4, V) bool from `allowed_table`, on the logits' device."""

    def __init__(self, allowed: torch.Tensor, grid_tokens: int, max_images: int):
        self.allowed, self.grid_tokens, self.max_images = allowed, grid_tokens, max_images

    def state(self, row: RowView) -> int:
        if row.in_image:
            return EOI if row.image_filled >= self.grid_tokens else CODES
        fits = row.budget - len(row.generated) >= self.grid_tokens + 2
        return TEXT_OR_PICTURE if row.images_made < self.max_images and fits else TEXT

    def __call__(self, logits: torch.Tensor, step: StepView) -> torch.Tensor:
        states = torch.tensor([self.state(row) for row in step.rows], device=self.allowed.device)
        return logits.masked_fill(~self.allowed[states], float("-inf"))


class RepetitionPenalty:
    """CTRL's penalty (`apply_repetition_penalty`) on text rows, over the text ids of each document so far (its
    prompt and what it generated). Keeps a (B, V) bool `seen` that it brings up to date at each call, so build
    one per generate call."""

    def __init__(self, vocab: Vocabulary, penalty: float, device: torch.device | str):
        self.vocab = vocab
        self.penalty = torch.full((1,), penalty, dtype=torch.float32, device=device)
        self.seen: torch.Tensor | None = None
        self.counted: list[int] = []  # generated tokens already in `seen`, per row

    def _update(self, rows: Sequence[RowView]) -> None:
        if self.seen is None:
            self.seen = torch.zeros(len(rows), self.vocab.size, dtype=torch.bool, device=self.penalty.device)
            for number, row in enumerate(rows):
                self.seen[number, [t for t in row.prompt if self.vocab.is_text(t)]] = True
            self.counted = [0] * len(rows)
        for number, row in enumerate(rows):
            for token in row.generated[self.counted[number]:]:
                if self.vocab.is_text(token):  # a picture's ids are never text
                    self.seen[number, token] = True
            self.counted[number] = len(row.generated)

    def __call__(self, logits: torch.Tensor, step: StepView) -> torch.Tensor:
        self._update(step.rows)
        penalty = torch.where(step.in_image, torch.ones_like(self.penalty), self.penalty)  # (B,): 1 on picture rows
        return apply_repetition_penalty(logits, self.seen, penalty)


def _per_modality(text: float, image: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((1,), text, dtype=dtype, device=device), torch.full((1,), image, dtype=dtype, device=device))


def _pick(pair: tuple[torch.Tensor, torch.Tensor], step: StepView) -> torch.Tensor:
    """(B,): each row's setting, the picture one on picture rows."""
    return torch.where(step.in_image, pair[1], pair[0])


class SamplingFilter:
    """Temperature, top-k and top-p (`filter_logits`) with the settings of each row's modality."""

    def __init__(self, text: ModalitySampling, image: ModalitySampling, device: torch.device | str):
        self.temperature = _per_modality(text.temperature, image.temperature, torch.float32, device)
        self.top_k = _per_modality(text.top_k, image.top_k, torch.long, device)
        self.top_p = _per_modality(text.top_p, image.top_p, torch.float32, device)

    def __call__(self, logits: torch.Tensor, step: StepView) -> torch.Tensor:
        return filter_logits(logits, _pick(self.temperature, step), _pick(self.top_k, step), _pick(self.top_p, step))


# -- selection and stopping ---------------------------------------------------------------------------------------
class TokenSelector:
    """One token per row (`draw`): the exponential race on the row's own noise, greedy (argmax) where the row's
    modality has temperature 0. Every row draws noise at every step, finished or not, so a document's draws do
    not depend on the batch it is in. Returns B ints."""

    def __init__(self, generators: RowGenerators, text: ModalitySampling, image: ModalitySampling,
                 device: torch.device | str):
        self.generators = generators
        self.temperature = _per_modality(text.temperature, image.temperature, torch.float32, device)

    def __call__(self, logits: torch.Tensor, step: StepView) -> list[int]:
        noise = self.generators.exponential(logits.shape[-1])
        return draw(logits, noise, _pick(self.temperature, step) == 0).tolist()


StoppingRule = Callable[[RowView, int], "str | None"]  # (row with the token appended, token) -> finish reason


@dataclass(frozen=True)
class StopAt:
    """Stop with `reason` when the row draws `token`."""

    token: int
    reason: str

    def __call__(self, row: RowView, token: int) -> str | None:
        return self.reason if token == self.token else None


def budget_spent(row: RowView, token: int) -> str | None:
    return "length" if len(row.generated) >= row.budget else None


def stopping_rules(mode: str, special: SpecialIds) -> list[StoppingRule]:
    """<eos>; in image mode the picture's <eoi> (one picture, then the document ends); the token budget."""
    rules: list[StoppingRule] = [StopAt(special.eos, "eos")]
    if mode == "image":
        rules.append(StopAt(special.eoi, "image"))
    return rules + [budget_spent]


def stop_reason(rules: Sequence[StoppingRule], row: RowView, token: int) -> str | None:
    """The first rule's reason to stop, or None to go on."""
    for rule in rules:
        reason = rule(row, token)
        if reason is not None:
            return reason
    return None
