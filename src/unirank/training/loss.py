"""Softmax losses over items (and, for suggest rows, over the query catalogue): the full catalogue,
or sampled (in-batch targets + shared uniform negatives) with logQ correction so the sampled
estimate targets the same full softmax. Each task's positions are averaged separately and combined
with the task weights (task-balanced)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unirank.model.ranker import NUM_TASK_IDS, UnifiedRanker
from unirank.model.request import QueryTask, Task
from unirank.training.batches import StepInputs, local_batch, step_inputs
from unirank.data.examples import TrainBatch, item_counts

CHUNK_BYTES = 16 << 20  # logits per chunk of the full softmax: below glibc's largest mmap threshold (32 MB)


def softmax_loss(ranker: UnifiedRanker, batch: TrainBatch, num_negatives: int, item_freq: torch.Tensor,
                 generator: torch.Generator, task_weights: dict[Task, float], query_freq: torch.Tensor | None = None,
                 **options) -> tuple[torch.Tensor, dict]:
    """One process's loss of a whole batch: (task-weighted loss, {task: mean cross-entropy}).
    `item_freq` [num_items + 2] is the training frequency of each id, for the probability that an item
    is among the in-batch targets (`query_freq` likewise for suggest rows); `options` are step_loss's."""
    seed = int(torch.randint(1 << 62, (1,), generator=generator)) if ranker.training else None
    inputs = step_inputs(ranker, batch, num_negatives=num_negatives, item_freq=item_freq, generator=generator,
                         id_dropout_seed=seed, query_freq=query_freq)
    total, sums = step_loss(ranker, inputs, task_weights, **options)
    counts = inputs.task_counts
    return total, {t: sums[int(t)] / counts[int(t)] for t in task_weights if counts[int(t)] > 0}


def step_loss(ranker: UnifiedRanker, inputs: StepInputs, task_weights: dict[Task, float],
              excluded_items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch's loss and its per-task cross-entropy sums [NUM_TASK_IDS]
    (detached). The global loss is sum_t w_t * mean over task t's positions; each rank returns
    W * sum_t w_t * (sum over ITS positions of task t) / N_t with N_t the GLOBAL count, so the mean of
    the ranks' gradients (DDP; TorchRec's pooled all-to-all divides table gradients by W too) is the
    gradient of the global loss, and one process (W = 1) computes exactly the task-weighted mean.
    `excluded_items`: ids that are not in the catalogue at training time (never a negative).
    The logits come from the model (`UnifiedRanker.position_logits`: the score terms included, not the
    inference-only ones such as model.fresh_boost).
    Suggest rows (targets = query ids) take a softmax over the query catalogue instead (`query_loss`).
    `ranker.config.content_distill` w > 0 adds w * `content_distillation` of the rank's item targets."""
    req, batch = inputs.request, local_batch(inputs)
    hidden, _, cand_vec = ranker.encode(req.task, req.history, req.history_lengths, req.query, req.query_lengths,
                                        req.source_item, items=inputs.items)
    targets = batch.targets[:, : hidden.shape[1] - 1]
    keep = targets > 0
    suggest_rows = (req.task == QueryTask.SUGGEST).unsqueeze(1)
    keep_queries, keep = keep & suggest_rows, keep & ~suggest_rows
    query_targets, h_queries = targets[keep_queries], hidden[:, 1:][keep_queries]
    h, targets = hidden[:, 1:][keep], targets[keep]
    row_task = req.task.unsqueeze(1).expand_as(keep)[keep]

    if inputs.full:
        # Columns = ids 1..n only (padding and OOV rows are never candidates): label = id - 1.
        per_position = full_softmax_cross_entropy(ranker.position_logits(req, keep, h, cand_vec), len(h),
                                                  cand_vec.shape[0] * cand_vec.element_size(), targets - 1,
                                                  None if excluded_items is None else excluded_items - 1)
    else:
        candidates = inputs.candidates
        logits = ranker.position_logits(req, keep, h, cand_vec, candidates, inputs.logq,
                                        CHUNK_BYTES)(slice(0, len(targets)))
        per_position = sampled_cross_entropy(logits, candidates, inputs.num_unique_targets, targets, excluded_items)
    if QueryTask.SUGGEST in task_weights:  # every rank looks the catalogue up, suggest rows or not
        per_position = torch.cat([per_position, query_loss(ranker, inputs, h_queries, query_targets)])
        row_task = torch.cat([row_task, torch.full_like(query_targets, int(QueryTask.SUGGEST))])
    scale = torch.zeros(NUM_TASK_IDS, device=h.device)
    for task, weight in task_weights.items():
        count = int(inputs.task_counts[int(task)])
        if count:
            scale[int(task)] = inputs.world * weight / count
    loss = (per_position * scale[row_task]).sum() + 0.0 * hidden.sum()  # a rank with no position: still a graph
    if ranker.config.content_distill:
        loss = loss + ranker.config.content_distill * content_distillation(ranker, targets)
    sums = torch.zeros(NUM_TASK_IDS, device=h.device).index_add_(0, row_task, per_position.detach())
    return loss, sums


def sampled_cross_entropy(logits: torch.Tensor, candidates: torch.Tensor, num_unique_targets: int,
                          targets: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row cross-entropy over sampled candidates (the unique targets first, then the negatives;
    logits already logQ-corrected): a candidate equal to another row's target drawn again, or an
    excluded id, is masked (accidental hits)."""
    labels = torch.searchsorted(candidates[:num_unique_targets], targets)
    hits = candidates.unsqueeze(0) == targets.unsqueeze(1)
    hits[torch.arange(len(targets), device=hits.device), labels] = False  # the target also drawn as a negative
    if excluded is not None:
        hits |= torch.isin(candidates, excluded).unsqueeze(0)
    return F.cross_entropy(logits.masked_fill(hits, -torch.inf), labels, reduction="none")


def content_distillation(ranker: UnifiedRanker, items: torch.Tensor) -> torch.Tensor:
    """ALDI-style: mean over the unique `items` (this rank's item targets: the warm items the step has
    evidence for, drawn by popularity) of ||content vector - full vector||^2, the full vector (with
    the id row) a fixed teacher. The content vector (text projection, attribute / word bags,
    semantic IDs) learns to stand where the item's full vector stands, so an item with no id row (a
    new item) lands where contexts look, and the id row becomes the residual content cannot explain."""
    uniq = torch.unique(items)
    content, full = ranker.item_tower.content_and_full(uniq)
    return (content - full.detach()).pow(2).sum() / max(len(uniq), 1)


def query_loss(ranker: UnifiedRanker, inputs: StepInputs, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of suggest positions h [N, d] against the query catalogue (ids
    1..num_queries, every query through the search query path), or against the sampled queries
    (inputs.query_candidates: unique targets, then negatives; logQ-corrected, accidental hits masked)."""
    if inputs.query_candidates is None:
        queries = ranker.all_query_embeddings()[1: ranker.config.num_queries + 1]
        return full_softmax_cross_entropy(lambda rows: ranker.similarity(h[rows], queries), len(h),
                                          queries.shape[0] * queries.element_size(), targets - 1)
    candidates = inputs.query_candidates
    tokens, lengths = ranker.query_tokens[candidates], ranker.query_token_lengths[candidates]
    logits = ranker.similarity(h, ranker.query_vectors(tokens, lengths)) - inputs.query_logq.unsqueeze(0)
    return sampled_cross_entropy(logits, candidates, inputs.num_unique_query_targets, targets)


def full_softmax_cross_entropy(logits_of, num_rows: int, row_bytes: int, labels: torch.Tensor,
                               excluded_columns: torch.Tensor | None = None,
                               chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Per-row cross-entropy of `num_rows` rows of logits over C columns (item ids 1..C), `logits_of`
    (a slice of rows -> [rows, C]; UnifiedRanker.position_logits) called in row chunks of at most
    `chunk_bytes` of logits (`row_bytes` per row). Same values and gradients as one [N, C] matrix;
    the chunks stay in the allocator's heap instead of being mapped from and returned to the OS at
    every step (one [positions x catalogue] matrix is tens of MB)."""
    rows = max(1, chunk_bytes // max(1, row_bytes))
    out = []
    for start in range(0, num_rows, rows):
        logits = logits_of(slice(start, start + rows))
        if excluded_columns is not None:
            logits = logits.index_fill(1, excluded_columns, -torch.inf)
        out.append(F.cross_entropy(logits, labels[start: start + rows], reduction="none"))
    return torch.cat(out) if out else labels.new_zeros(0, dtype=torch.float32)


def item_frequencies(train: list[np.ndarray], num_items: int) -> torch.Tensor:
    counts = item_counts(train, num_items).astype(np.float64)
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()
