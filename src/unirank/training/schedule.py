"""A run's schedule sized by its data: how many epochs, when to validate, the learning-rate curve.

A recipe names epochs, but what trains a model is optimizer updates: 9 epochs are ~1,600 updates
on Amazon Beauty (22k users, batch 128) and 45 on MovieLens latest-small (610 users).
`train.min_steps` is a floor in updates: the run trains max(max_epochs, ceil(min_steps / steps per
epoch)) epochs. `train.eval_rounds` keeps the number of validation rounds in step with the run's
length (train.eval_every stays the finest cadence), and the warm-up (`train.warmup_fraction`) and
the cosine decay are fractions of the run's total steps."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from unirank.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    epochs: int  # the run trains epochs 1..epochs
    steps_per_epoch: int
    eval_every: int  # epochs between validation rounds (the last epoch is always validated)
    warmup_steps: int
    lr_schedule: str  # constant | cosine

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def validates(self, epoch: int) -> bool:
        return epoch % self.eval_every == 0 or epoch == self.epochs

    def to_dict(self) -> dict:
        return {**asdict(self), "total_steps": self.total_steps}


def sized_schedule(train: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The schedule of a run of `train` over data with `steps_per_epoch` optimizer steps per epoch."""
    epochs = max(train.max_epochs, math.ceil(train.min_steps / steps_per_epoch))
    every = max(train.eval_every, math.ceil(epochs / train.eval_rounds)) if train.eval_rounds else train.eval_every
    warmup = train.warmup_steps if train.warmup_fraction is None else round(train.warmup_fraction * epochs
                                                                            * steps_per_epoch)
    return Schedule(epochs, steps_per_epoch, every, warmup, train.lr_schedule)


def lr_factor(step: int, schedule: Schedule) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warm-up, then constant or
    cosine down to 0 at the run's last step."""
    warmup = schedule.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, schedule.total_steps - warmup))
    # a Python float: the optimizer state (checkpoints load weights-only) must hold no numpy scalars
    return float(0.5 * (1.0 + np.cos(np.pi * progress)))
