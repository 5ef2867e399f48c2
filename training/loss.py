"""Softmax losses over items: the full catalogue, or sampled (in-batch targets + shared uniform
negatives) with logQ correction so the sampled estimate targets the same full softmax."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unirank.model.ranker import UnifiedRanker
from unirank.training.examples import TrainBatch


def _positions(hidden: torch.Tensor, lengths: torch.Tensor, batch: TrainBatch):
    """(query vectors [P, d], target ids [P]) of the positions that carry a target."""
    if batch.all_positions:
        h, targets = hidden[:, 1:], batch.targets[:, : hidden.shape[1] - 1]
        keep = targets > 0
        return h[keep], targets[keep]
    return hidden[torch.arange(hidden.shape[0]), lengths - 1], batch.targets[:, 0]


def softmax_loss(ranker: UnifiedRanker, batch: TrainBatch, num_negatives: int,
                 item_freq: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean cross-entropy of the target among the items. `item_freq` [num_items + 2] is the
    training frequency of each id (for the in-batch sampling probability)."""
    req = batch.request
    n = ranker.num_items
    if num_negatives == 0 or num_negatives >= n:
        hidden, lengths, _ = ranker.encode(req.task, req.history, req.history_lengths, req.query,
                                           req.query_lengths, req.source_item)
        h, targets = _positions(hidden, lengths, batch)
        logits = ranker.similarity(h, ranker.all_item_embeddings())
        logits[:, 0] = -torch.inf
        logits[:, n + 1] = -torch.inf
        return F.cross_entropy(logits, targets)

    uniq_targets = torch.unique(batch.targets[batch.targets > 0])
    negatives = torch.randint(1, n + 1, (num_negatives,), generator=generator)
    candidates = torch.cat([uniq_targets, negatives])
    hidden, lengths, cand_vec = ranker.encode(req.task, req.history, req.history_lengths, req.query,
                                              req.query_lengths, req.source_item, extra_items=candidates)
    h, targets = _positions(hidden, lengths, batch)
    logits = ranker.similarity(h, cand_vec)
    # P(item in candidate set) ~ drawn among the batch's targets + drawn uniformly.
    q = (len(targets) * item_freq[candidates] + num_negatives / n).clamp(max=1.0)
    logits = logits - torch.log(q).unsqueeze(0)
    label = torch.searchsorted(uniq_targets, targets)
    hits = candidates.unsqueeze(0) == targets.unsqueeze(1)
    hits[torch.arange(len(targets)), label] = False  # accidental hits: the target drawn as a negative
    logits = logits.masked_fill(hits, -torch.inf)
    return F.cross_entropy(logits, label)


def item_frequencies(train: list[np.ndarray], num_items: int) -> torch.Tensor:
    counts = np.bincount(np.concatenate(train), minlength=num_items + 2)[: num_items + 2].astype(np.float64)
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()
