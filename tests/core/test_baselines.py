"""The sequential pre-query baseline, on hand-made sequences."""
from __future__ import annotations

import numpy as np
import torch

from unirank.evaluation.baselines import LastItemTransitions
from unirank.model.request import RankRequest, Task


def request(histories: list[list[int]]) -> RankRequest:
    width = max(len(h) for h in histories)
    history = torch.tensor([h + [0] * (width - len(h)) for h in histories])
    b = len(histories)
    zeros = torch.zeros(b, dtype=torch.int64)
    return RankRequest(torch.full((b,), int(Task.PREQUERY)), history, torch.tensor([len(h) for h in histories]),
                       torch.zeros(b, 1, dtype=torch.int64), zeros, zeros)


def test_counts_what_followed_the_last_item_then_popularity():
    train = [np.array([1, 2, 3]), np.array([1, 2]), np.array([1, 4]), np.array([4, 4, 4])]
    scores = LastItemTransitions(train, num_items=4).scores(Task.PREQUERY, request([[3, 1], [2], []]))
    assert scores.shape == (3, 6)
    # after 1: item 2 twice, item 4 once
    assert scores[0].argsort(descending=True)[:2].tolist() == [2, 4]
    assert scores[0, 2] - scores[0, 4] > 0.99
    # after 2: item 3 once; nothing else followed 2, so the rest go by popularity (4 is the most frequent)
    assert scores[1].argsort(descending=True)[:2].tolist() == [3, 4]
    # no history: popularity alone
    assert scores[2].argmax().item() == 4 and scores[2].max() < 1e-3


def test_unknown_last_item_gets_popularity():
    train = [np.array([1, 2]), np.array([2, 2])]
    scores = LastItemTransitions(train, num_items=2).scores(Task.PREQUERY, request([[7]]))
    assert scores[0].argmax().item() == 2 and scores[0].max() < 1e-3
