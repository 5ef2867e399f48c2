"""Softmax losses over items: the full catalogue, or sampled (in-batch targets + shared uniform
negatives) with logQ correction so the sampled estimate targets the same full softmax. Each task's
positions are averaged separately and combined with the task weights (task-balanced)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unirank.model.ranker import UnifiedRanker
from unirank.model.request import Task
from unirank.training.examples import TrainBatch


def softmax_loss(ranker: UnifiedRanker, batch: TrainBatch, num_negatives: int, item_freq: torch.Tensor,
                 generator: torch.Generator, task_weights: dict[Task, float],
                 excluded_items: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(task-weighted loss, {task: mean cross-entropy}). `item_freq` [num_items + 2] is the training
    frequency of each id, for the probability that an item is among the in-batch targets.
    `excluded_items`: ids that are not in the catalogue at training time (never a negative)."""
    req, n = batch.request, ranker.num_items
    full = num_negatives == 0 or num_negatives >= n
    if full:
        candidates = None
    else:
        uniq_targets = torch.unique(batch.targets[batch.targets > 0])
        negatives = torch.randint(1, n + 1, (num_negatives,), generator=generator)
        candidates = torch.cat([uniq_targets, negatives])
    hidden, _, cand_vec = ranker.encode(req.task, req.history, req.history_lengths, req.query,
                                        req.query_lengths, req.source_item, extra_items=candidates)
    targets = batch.targets[:, : hidden.shape[1] - 1]
    keep = targets > 0
    h, targets = hidden[:, 1:][keep], targets[keep]
    row_task = req.task.unsqueeze(1).expand_as(keep)[keep]

    if full:
        # Columns = ids 1..n only (padding and OOV rows are never candidates): label = id - 1.
        logits = ranker.similarity(h, ranker.all_item_embeddings()[1: n + 1])
        if excluded_items is not None:
            logits[:, excluded_items - 1] = -torch.inf
        labels = targets - 1
    else:
        logits = ranker.similarity(h, cand_vec)
        # P(item in candidate set) ~ drawn among the batch's targets + drawn uniformly.
        q = (len(targets) * item_freq[candidates] + num_negatives / n).clamp(max=1.0)
        logits = logits - torch.log(q).unsqueeze(0)
        labels = torch.searchsorted(uniq_targets, targets)
        hits = candidates.unsqueeze(0) == targets.unsqueeze(1)
        hits[torch.arange(len(targets)), labels] = False  # the target also drawn as a negative
        if excluded_items is not None:
            hits |= torch.isin(candidates, excluded_items).unsqueeze(0)
        logits = logits.masked_fill(hits, -torch.inf)
    per_position = F.cross_entropy(logits, labels, reduction="none")
    per_task = {task: per_position[row_task == task].mean() for task in task_weights if (row_task == task).any()}
    total = sum(task_weights[t] * loss for t, loss in per_task.items())
    return total, per_task


def item_frequencies(train: list[np.ndarray], num_items: int) -> torch.Tensor:
    counts = np.bincount(np.concatenate(train), minlength=num_items + 2)[: num_items + 2].astype(np.float64)
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()
