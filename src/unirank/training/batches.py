"""The training data path after TrainingExamples: one global batch -> this rank's step inputs.

Every rank draws the SAME global batch (same seed and train.batch_size at any world size) and keeps
rows rank, rank + W, rank + 2W, ... (strided, so every rank gets rows of every task). What the loss
needs from the whole batch is computed here from the global batch, identically on every rank, so
no communication is needed: the per-task target counts that normalise the loss, the sampled-softmax
candidates (unique targets + negatives from a generator seeded alike on every rank) and their logQ.
The item tower's input (the jagged features of every id the step looks up, the softmax candidates
included) is built here too, before the model runs: with sharded tables it is the KeyedJaggedTensor
that the input all-to-all starts from (docs/DISTRIBUTED.md)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unirank.model.ranker import NUM_TASK_IDS, ItemBatch, UnifiedRanker
from unirank.model.request import QueryTask, RankRequest
from unirank.data.examples import TrainBatch


@dataclass
class StepInputs:
    request: RankRequest  # this rank's rows
    targets: torch.Tensor  # [b, 1 + W] aligned with the model's outputs after the TASK token (0 = none)
    items: ItemBatch  # tower input: the request's ids, then the softmax candidates
    candidates: torch.Tensor | None  # sampled softmax: unique global targets, then negatives; None = catalogue
    logq: torch.Tensor | None  # log P(candidate in the sampled set), from the global batch
    num_unique_targets: int  # the sampled candidates' first entries (the labels' columns)
    task_counts: torch.Tensor  # [NUM_TASK_IDS] target positions of each task in the GLOBAL batch (stays on the CPU)
    world: int
    # suggest rows (targets = query ids): sampled softmax over queries, as for items; None = the catalogue
    query_candidates: torch.Tensor | None = None
    query_logq: torch.Tensor | None = None
    num_unique_query_targets: int = 0

    @property
    def full(self) -> bool:
        return self.candidates is None

    def to(self, device: torch.device | str) -> "StepInputs":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, request=self.request.to(device), targets=move(self.targets), items=self.items.to(device),
                       candidates=move(self.candidates), logq=move(self.logq),
                       query_candidates=move(self.query_candidates), query_logq=move(self.query_logq))


def step_inputs(ranker: UnifiedRanker, batch: TrainBatch, *, num_negatives: int, item_freq: torch.Tensor,
                generator: torch.Generator, rank: int = 0, world: int = 1,
                id_dropout_seed: int | None = None, query_freq: torch.Tensor | None = None) -> StepInputs:
    """This rank's share of `batch` (on the batch's device, CPU). `id_dropout_seed` (training): the
    step's id-dropout draw, a hash of (item, seed), so every rank drops the same items. `query_freq`
    [num_queries + 2]: the training frequency of each query id (suggest rows, sampled softmax)."""
    req, n, dev = batch.request, ranker.num_items, batch.targets.device
    width = 1 + min(req.history.shape[1], ranker.config.max_history)  # model outputs after the TASK token
    keep = batch.targets[:, :width] > 0
    row_task = req.task.unsqueeze(1).expand_as(keep)[keep]
    counts = torch.bincount(row_task, minlength=NUM_TASK_IDS).cpu()
    suggest_rows = (req.task == QueryTask.SUGGEST).unsqueeze(1)
    item_targets = batch.targets.masked_fill(suggest_rows, 0)  # suggest targets are query ids, not items
    keep = keep & ~suggest_rows[:, :1].expand_as(keep)
    num_unique = 0
    if num_negatives == 0 or num_negatives >= n:
        candidates = logq = None
        extra = torch.arange(1, n + 1, device=dev)  # the whole catalogue (never padding / OOV) goes through the same lookup
    else:
        uniq = torch.unique(item_targets[item_targets > 0])
        negatives = torch.randint(1, n + 1, (num_negatives,), generator=generator, device=generator.device).to(dev)
        candidates = torch.cat([uniq, negatives])
        # P(item in candidate set) ~ drawn among the batch's targets + drawn uniformly
        logq = torch.log((int(keep.sum()) * item_freq[candidates] + num_negatives / n).clamp(max=1.0))
        extra, num_unique = candidates, len(uniq)
    rows = torch.arange(rank, req.batch_size, world, device=dev)
    local = RankRequest(task=req.task[rows], history=req.history[rows], history_lengths=req.history_lengths[rows],
                        query=req.query[rows], query_lengths=req.query_lengths[rows],
                        source_item=req.source_item[rows])
    items = ranker.item_batch(local.task, local.history, local.history_lengths, local.query, local.query_lengths,
                              local.source_item, extra_items=extra, id_dropout_seed=id_dropout_seed)
    query_sample = {}
    if num_negatives and query_freq is not None and num_negatives < ranker.config.num_queries:
        query_sample = sampled_queries(batch, num_negatives, query_freq, generator)
    return StepInputs(local, batch.targets[rows], items, candidates, logq, num_unique, counts, world, **query_sample)


def sampled_queries(batch: TrainBatch, num_negatives: int, query_freq: torch.Tensor,
                    generator: torch.Generator) -> dict:
    """The suggest rows' sampled softmax candidates: the batch's unique target queries + uniform
    negatives over the catalogue, logQ as for items (no suggest row: no draw, the item tasks'
    random stream stays as it was)."""
    targets = batch.targets.masked_fill((batch.request.task != QueryTask.SUGGEST).unsqueeze(1), 0)
    if not (targets > 0).any():
        return {}
    nq = len(query_freq) - 2
    uniq = torch.unique(targets[targets > 0])
    negatives = torch.randint(1, nq + 1, (num_negatives,), generator=generator, device=generator.device).to(uniq.device)
    candidates = torch.cat([uniq, negatives])
    logq = torch.log((int((targets > 0).sum()) * query_freq.to(uniq.device)[candidates] + num_negatives / nq).clamp(max=1.0))
    return {"query_candidates": candidates, "query_logq": logq, "num_unique_query_targets": len(uniq)}


def local_batch(inputs: StepInputs) -> TrainBatch:
    """The rank's rows as a TrainBatch (for the per-row parts of the loss)."""
    return TrainBatch(inputs.request, inputs.targets)
