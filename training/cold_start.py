"""Cold-start item split: items the model never trains on, evaluated as next-item targets.

Choices (deterministic given the seed):
- Eligible items are those that are the LAST item of at least one user's sequence with at least
  one earlier item, so every held-out ("cold") item is the test target of some user, exactly
  where the leave-one-out protocol puts its test target.
- `fraction` is a share of all distinct items in the sequences (rounded, at least 1), drawn
  uniformly from the eligible items; it is capped at the number of eligible items.
- Every interaction with a cold item is removed from every sequence (including histories of
  other users): the model sees no id, co-occurrence or position signal for a cold item, only its
  content. `train_sequences` keeps one (possibly shorter, possibly empty) list per user in the
  input order; run the usual leave-one-out split on it for warm training and validation.
- Evaluation cases are the users whose last item is cold: the history is their sequence before
  the target with cold items removed (the model could not have embedded them from ids either);
  users left with an empty history are dropped. Rank the full catalogue, cold items included.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class ColdStartCase(NamedTuple):
    user_index: int  # position of the user in the input sequences
    history: list[int]  # items before the target, chronological, cold items removed
    target: int  # the cold item


class ColdStartSplit(NamedTuple):
    train_sequences: list[list[int]]  # per user, every cold item removed
    eval_cases: list[ColdStartCase]
    cold_items: list[int]  # sorted; no row of train_sequences contains any of them


def cold_start_split(sequences: Sequence[Sequence[int]], seed: int,
                     fraction: float = 0.05) -> ColdStartSplit:
    """Hold out ~`fraction` of the items (chosen among users' last items) as cold test targets."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    num_items = len({item for seq in sequences for item in seq})
    eligible = sorted({seq[-1] for seq in sequences if len(seq) >= 2})
    if not eligible:
        raise ValueError("no user sequence has 2+ items, so no item can be a cold test target")
    num_cold = min(len(eligible), max(1, round(fraction * num_items)))
    rng = np.random.default_rng(seed)
    cold = sorted(int(i) for i in rng.choice(eligible, size=num_cold, replace=False))
    cold_set = set(cold)

    train_sequences = [[item for item in seq if item not in cold_set] for seq in sequences]
    eval_cases = []
    for user, seq in enumerate(sequences):
        if seq and seq[-1] in cold_set:
            history = [item for item in seq[:-1] if item not in cold_set]
            if history:
                eval_cases.append(ColdStartCase(user, history, seq[-1]))
    return ColdStartSplit(train_sequences, eval_cases, cold)
