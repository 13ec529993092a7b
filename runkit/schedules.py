"""Learning-rate schedules: linear warm-up, then a decay to `min_ratio` of the peak, for every trainer.

    warm-up    step < warmup_steps:  peak * (step + 1) / warmup_steps       (steps are 0-based optimizer steps)
    then, with progress = min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps)):
    cosine     peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + cos(pi * progress)))
    chameleon  peak * min_ratio ** progress                                  (exponential decay, Chameleon's)
    constant   peak

The operations run in this order, so the numbers are bit for bit those the trainers computed before they shared
this code: vqtok and the image encoder ask for the lr itself (`lr`, peak = train.lr); unified_lm asks for the
multiplier (`factor`, peak 1.0) that torch's LambdaLR applies to each parameter group's own lr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("cosine", "chameleon", "constant")


@dataclass(frozen=True)
class Schedule:
    warmup_steps: int
    total_steps: int
    min_ratio: float
    shape: str = "cosine"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown lr schedule {self.shape!r}; choose one of {list(SHAPES)}")

    @classmethod
    def of(cls, train) -> Schedule:
        """The schedule a training config asks for: its warmup_steps, steps, min_lr_ratio, and schedule when it
        has one (cosine otherwise)."""
        return cls(train.warmup_steps, train.steps, train.min_lr_ratio, getattr(train, "schedule", "cosine"))

    def lr(self, step: int, peak: float) -> float:
        """The learning rate of optimizer step `step` (0-based) for a peak of `peak`."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.shape == "constant":
            return peak * 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.shape == "chameleon":
            return peak * self.min_ratio ** progress
        return peak * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def factor(self, step: int) -> float:
        """The multiplier of the peak lr at optimizer step `step` (0-based)."""
        return self.lr(step, 1.0)
