"""Softmax losses over items (and, for suggest rows, over the query catalogue): the full catalogue,
or sampled (in-batch targets + shared uniform negatives) with logQ correction so the sampled
estimate targets the same full softmax. Each task's positions are averaged separately and combined
with the task weights (task-balanced)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unirank.model.ranker import NUM_TASK_IDS, UnifiedRanker
from unirank.model.request import QueryTask, RankRequest, Task
from unirank.model.scoring import hidden_catalogue, hidden_ids
from unirank.training.distill import Teachers
from unirank.training.batches import StepInputs, local_batch, step_inputs
from unirank.data.examples import TrainBatch

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
              excluded_items: torch.Tensor | None = None, mask_seen: bool = False,
              future_window: int = 0, future_weight: float = 0.0,
              label_smoothing: float = 0.0, teachers: Teachers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch's loss and its per-task cross-entropy sums [NUM_TASK_IDS]
    (detached). The global loss is sum_t w_t * mean over task t's positions; each rank returns
    W * sum_t w_t * (sum over ITS positions of task t) / N_t with N_t the GLOBAL count, so the mean of
    the ranks' gradients (DDP; TorchRec's pooled all-to-all divides table gradients by W too) is the
    gradient of the global loss, and one process (W = 1) computes exactly the task-weighted mean.
    `excluded_items`: ids that are not in the catalogue at training time (never a negative).
    `mask_seen`: each position's softmax also skips the items the evaluation filters for it (the
    history before the target, the similar-item source), so training ranks what evaluation ranks;
    an item equal to the position's own target stays a candidate.
    `future_window` K, `future_weight` a: a pre-query position's target becomes a distribution, 1 - a
    on the next item and a shared equally by the K items after it that the window holds (all of it on
    the next item at the window's end); other tasks keep their one target.
    `label_smoothing` e: each row's target distribution gives e to the uniform distribution over that
    row's candidates (the catalogue less excluded and masked items, or the sampled set).
    `teachers` (full softmax only): each position's loss becomes (1 - w) * the loss above + w * the
    distillation loss against the teachers' distribution (training/distill.py); the per-task values
    returned are then that mix.
    Suggest rows (targets = query ids) take a softmax over the query catalogue instead (`query_loss`);
    the options above are item-task options and leave them alone, label smoothing aside.
    `ranker.config.content_distill` w > 0 adds w * `content_distillation` of the rank's item targets."""
    req, n, batch = inputs.request, ranker.num_items, local_batch(inputs)
    if teachers is not None and not inputs.full:
        raise ValueError("distillation needs the full softmax (train.num_negatives=0)")
    hidden, _, cand_vec = ranker.encode(req.task, req.history, req.history_lengths, req.query, req.query_lengths,
                                        req.source_item, items=inputs.items)
    targets = batch.targets[:, : hidden.shape[1] - 1]
    keep = targets > 0
    suggest_rows = (req.task == QueryTask.SUGGEST).unsqueeze(1)
    keep_queries, keep = keep & suggest_rows, keep & ~suggest_rows
    query_targets, h_queries = targets[keep_queries], hidden[:, 1:][keep_queries]
    h, targets = hidden[:, 1:][keep], targets[keep]
    row_task = req.task.unsqueeze(1).expand_as(keep)[keep]
    if teachers is not None:
        teachers.observe(req, keep)
    labels_k = weights_k = None  # [N, 1 + K] ids and weights of the soft targets (future_window)
    if future_window and future_weight:
        labels_k, weights_k = future_targets(batch, req, keep.shape[1], future_window, future_weight)
        labels_k, weights_k = labels_k[keep], weights_k[keep]
    seen = None
    if mask_seen:  # a seen item that is one of the position's targets stays a candidate
        seen = seen_items(req, hidden.shape[1] - 1)[keep]
        own = targets.unsqueeze(1) if labels_k is None else labels_k
        is_target = (seen.unsqueeze(2) == own.unsqueeze(1)).any(dim=2)
        seen = torch.where(is_target | (seen > n), torch.zeros_like(seen), seen)

    if inputs.full:
        # Columns = ids 1..n only (padding and OOV rows are never candidates): label = id - 1.
        per_position = full_softmax_cross_entropy(ranker.position_logits(req, keep, h, cand_vec), len(h),
                                                  cand_vec.shape[0] * cand_vec.element_size(),
                                                  targets - 1 if labels_k is None else (labels_k - 1).clamp(min=0),
                                                  None if excluded_items is None else excluded_items - 1,
                                                  masked_ids=seen, label_weights=weights_k,
                                                  label_smoothing=label_smoothing, teachers=teachers)
    else:
        candidates = inputs.candidates
        uniq_targets = candidates[: inputs.num_unique_targets]
        logits = ranker.position_logits(req, keep, h, cand_vec, candidates, inputs.logq,
                                        CHUNK_BYTES)(slice(0, len(targets)))
        labels = torch.searchsorted(uniq_targets, targets)
        hits = candidates.unsqueeze(0) == targets.unsqueeze(1)
        hits[torch.arange(len(targets), device=hits.device), labels] = False  # the target also drawn as a negative
        if excluded_items is not None:
            hits |= torch.isin(candidates, excluded_items).unsqueeze(0)
        if seen is not None:
            hits |= hidden_catalogue(seen, n)[:, candidates]
        logits = logits.masked_fill(hits, -torch.inf)
        if labels_k is None:
            per_position = F.cross_entropy(logits, labels, reduction="none")
        else:  # every future target of a pre-query row is some position's target: it is a candidate
            columns = torch.searchsorted(uniq_targets, labels_k).clamp(max=len(uniq_targets) - 1)
            per_position = soft_cross_entropy(logits, columns, weights_k)
        per_position = smooth(per_position, logits, label_smoothing)
    if QueryTask.SUGGEST in task_weights:  # every rank looks the catalogue up, suggest rows or not
        per_position = torch.cat([per_position, query_loss(ranker, inputs, h_queries, query_targets, label_smoothing)])
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


def content_distillation(ranker: UnifiedRanker, items: torch.Tensor) -> torch.Tensor:
    """ALDI-style: mean over the unique `items` (this rank's item targets: the warm items the step has
    evidence for, drawn by popularity) of ||content vector - full vector||^2, the full vector (with
    the id row) a fixed teacher. The content vector (text projection, attribute / word bags,
    semantic IDs) learns to stand where the item's full vector stands, so an item with no id row (a
    new item) lands where contexts look, and the id row becomes the residual content cannot explain."""
    uniq = torch.unique(items)
    content, full = ranker.item_tower.content_and_full(uniq)
    return (content - full.detach()).pow(2).sum() / max(len(uniq), 1)


def query_loss(ranker: UnifiedRanker, inputs: StepInputs, h: torch.Tensor, targets: torch.Tensor,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-position cross-entropy of suggest positions h [N, d] against the query catalogue (ids
    1..num_queries, every query through the search query path), or against the sampled queries
    (inputs.query_candidates: unique targets, then negatives; logQ-corrected, accidental hits masked)."""
    if inputs.query_candidates is None:
        queries = ranker.all_query_embeddings()[1: ranker.config.num_queries + 1]
        return full_softmax_cross_entropy(lambda rows: ranker.similarity(h[rows], queries), len(h),
                                          queries.shape[0] * queries.element_size(), targets - 1,
                                          label_smoothing=label_smoothing)
    candidates = inputs.query_candidates
    tokens, lengths = ranker.query_tokens[candidates], ranker.query_token_lengths[candidates]
    logits = ranker.similarity(h, ranker.query_vectors(tokens, lengths)) - inputs.query_logq.unsqueeze(0)
    labels = torch.searchsorted(candidates[: inputs.num_unique_query_targets], targets)
    hits = candidates.unsqueeze(0) == targets.unsqueeze(1)
    hits[torch.arange(len(targets), device=hits.device), labels] = False
    logits = logits.masked_fill(hits, -torch.inf)
    return smooth(F.cross_entropy(logits, labels, reduction="none"), logits, label_smoothing)


def full_softmax_cross_entropy(logits_of, num_rows: int, row_bytes: int, labels: torch.Tensor,
                               excluded_columns: torch.Tensor | None = None, chunk_bytes: int = CHUNK_BYTES,
                               masked_ids: torch.Tensor | None = None,
                               label_weights: torch.Tensor | None = None,
                               label_smoothing: float = 0.0, teachers: Teachers | None = None) -> torch.Tensor:
    """Per-row cross-entropy of `num_rows` rows of logits over C columns (item ids 1..C), `logits_of`
    (a slice of rows -> [rows, C]; UnifiedRanker.position_logits) called in row chunks of at most
    `chunk_bytes` of logits (`row_bytes` per row). Same values and gradients as one [N, C] matrix;
    the chunks stay in the allocator's heap instead of being mapped from and returned to the OS at
    every step (one [positions x catalogue] matrix is tens of MB). `masked_ids` [N, K]: per-row item ids left out of that row's softmax (0 = none).
    `label_weights` [N, L]: `labels` is then [N, L] columns with these weights (a soft target).
    `label_smoothing`, `teachers` (observed on the rows): as in `softmax_loss`."""
    rows = max(1, chunk_bytes // max(1, row_bytes))
    out = []
    for start in range(0, num_rows, rows):
        logits = logits_of(slice(start, start + rows))
        if excluded_columns is not None:
            logits = logits.index_fill(1, excluded_columns, -torch.inf)
        if masked_ids is not None:
            logits = logits.masked_fill(hidden_catalogue(masked_ids[start: start + rows], logits.shape[1])[:, 1:],
                                        -torch.inf)
        if label_weights is None:
            loss = F.cross_entropy(logits, labels[start: start + rows], reduction="none")
        else:
            loss = soft_cross_entropy(logits, labels[start: start + rows], label_weights[start: start + rows])
        loss = smooth(loss, logits, label_smoothing)
        if teachers is not None:
            loss = (1.0 - teachers.weight) * loss + teachers.weight * teachers.loss(logits, slice(start, start + rows))
        out.append(loss)
    return torch.cat(out) if out else labels.new_zeros(0, dtype=torch.float32)


def smooth(cross_entropy: torch.Tensor, logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(1 - e) * cross_entropy + e * the cross-entropy against the uniform distribution over each
    row's finite logits (-inf = not a candidate). PyTorch's own `label_smoothing` spreads e over every
    column, -inf ones included, which makes the loss infinite."""
    if not epsilon:
        return cross_entropy
    finite = torch.isfinite(logits)
    mean = logits.masked_fill(~finite, 0.0).sum(dim=1) / finite.sum(dim=1).clamp(min=1)
    return (1.0 - epsilon) * cross_entropy + epsilon * (torch.logsumexp(logits, dim=1) - mean)


def soft_cross_entropy(logits: torch.Tensor, columns: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against a sparse target distribution: `weights` [N, L] (rows sum to 1,
    0 = unused slot) on the logits' `columns` [N, L]."""
    picked = logits.gather(1, columns).masked_fill(weights == 0, 0.0)
    return torch.logsumexp(logits, dim=1) - (weights * picked).sum(dim=1)


def future_targets(batch: TrainBatch, req: RankRequest, positions: int, window: int,
                   weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, positions, 1 + window] item ids, same-shape weights): each position's target, then for
    pre-query rows the `window` items that follow it in the row (0 = none). The next item weighs
    1 - weight and the present future items share `weight`; rows of other tasks, and positions
    with no future item, put all the weight on the target."""
    padded = F.pad(batch.targets[:, :positions], (0, window))
    ids = torch.stack([padded[:, k: k + positions] for k in range(window + 1)], dim=2)
    ids[:, :, 1:] *= (req.task == Task.PREQUERY).view(-1, 1, 1)
    future = (ids[:, :, 1:] > 0).float()
    share = weight * future / future.sum(dim=2, keepdim=True).clamp(min=1.0)
    head = 1.0 - share.sum(dim=2, keepdim=True)
    return ids, torch.cat([head, share], dim=2) * (ids[:, :, :1] > 0)


def seen_items(req: RankRequest, positions: int) -> torch.Tensor:
    """[B, positions, W + 1] the ids hidden from the target at each output position (targets are
    aligned as in TrainBatch), by the rule of every served answer (scoring.hidden_ids) applied to the
    request as it stood there: the history before it, or the similar-item source; 0 = none."""
    history = req.history[:, : positions - 1]
    b, w = history.shape
    before = torch.arange(positions, device=history.device).clamp(max=w).unsqueeze(0).expand(b, -1)
    per_position = lambda t: t.unsqueeze(1).expand(b, positions, *t.shape[1:])  # noqa: E731
    return hidden_ids(per_position(req.task), per_position(history), before, per_position(req.source_item))


def item_frequencies(train: list[np.ndarray], num_items: int) -> torch.Tensor:
    counts = np.bincount(np.concatenate(train), minlength=num_items + 2)[: num_items + 2].astype(np.float64)
    return torch.from_numpy(counts / max(counts.sum(), 1.0)).float()
