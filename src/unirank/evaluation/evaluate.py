"""Per-task offline evaluation (docs/PROTOCOL.md): every catalogue item is scored, padding
and OOV ids are never ranked, personalized tasks (search, pre-query) drop the user's history items,
similar-item drops the source item. Suggest ranks every query of the query catalogue, nothing
filtered; its target is the query of the user's next search (a query outside the catalogue is a miss).

The request carries what a served request carries: the newest max_history items as `history` and the
user's whole seen set as `exclude`, and the items dropped are those the exported graph drops for that
request (model/scoring.py hidden_ids), so offline metrics measure what the server answers."""
from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from unirank.model.request import TASK_NAMES, QueryTask, RankRequest, Task
from unirank.model.ranker import UnifiedRanker
from unirank.model.scoring import hidden_catalogue, hidden_ids
from unirank.data.examples import EvalCases, RequestBuilder
from unirank.data.query_catalogue import suggest_cases, typed_prefixes
from unirank.evaluation.metrics import metrics_from_ranks, summarize, target_ranks

DEFAULT_KS = (5, 10, 20)


class Scorer(Protocol):
    name: str
    tasks: tuple

    def scores(self, task: Task, request: RankRequest) -> torch.Tensor: ...


class ModelScorer:
    """The ranker as a scorer over the whole id space (the query ids for suggest). The query
    vectors are computed once per scorer: make a new scorer after the weights change."""

    tasks = (Task.SEARCH, Task.SIMILAR, Task.PREQUERY)

    def __init__(self, ranker: UnifiedRanker, name: str = "unirank", tasks=None):
        self.ranker, self.name = ranker, name
        self._queries = None
        if tasks is not None:
            self.tasks = tuple(tasks)
        elif ranker.config.num_queries:
            self.tasks = (*self.tasks, QueryTask.SUGGEST)

    @torch.no_grad()
    def scores(self, task: Task, request: RankRequest) -> torch.Tensor:
        self.ranker.eval()
        device = self.ranker.no_context.device
        req = request.to(device)
        ctx = self.ranker(req.task, req.history, req.history_lengths, req.query, req.query_lengths, req.source_item)
        if task == QueryTask.SUGGEST:
            if self._queries is None:
                self._queries = self.ranker.all_query_embeddings()
            return self.ranker.score_queries(ctx, queries=self._queries).float().cpu()
        inputs = (req.task, req.history, req.history_lengths, req.query, req.query_lengths, req.source_item)
        return self.ranker.score(ctx, inputs=inputs).float().cpu()


class EnsembleScorer:
    """Several trained rankers as one scorer: the mean of their log-softmax over the catalogue ids
    (1..num_items), so rankers whose score scales differ (another width, another run) weigh the same.
    Offline evaluation only: `unirank export` writes one ranker."""

    tasks = (Task.SEARCH, Task.SIMILAR, Task.PREQUERY)

    def __init__(self, rankers: list[UnifiedRanker], name: str = "unirank"):
        if len(rankers) < 2:
            raise ValueError(f"an ensemble needs at least 2 rankers, got {len(rankers)}")
        sizes = {r.num_items for r in rankers}
        if len(sizes) != 1:
            raise ValueError(f"the rankers score different catalogues (num_items {sorted(sizes)})")
        self.members, self.name = [ModelScorer(r) for r in rankers], name

    @torch.no_grad()
    def scores(self, task: Task, request: RankRequest) -> torch.Tensor:
        total = None
        for member in self.members:
            s = member.scores(task, request)
            ids = s[:, 1:-1]  # padding (0) and OOV (last) are never ranked
            part = torch.full_like(s, -torch.inf)
            part[:, 1:-1] = torch.log_softmax(ids, dim=1)
            total = part if total is None else total + part
        return total / len(self.members)


def with_seen(task: Task, request: RankRequest, histories: list[np.ndarray]) -> RankRequest:
    """The request with the user's whole seen set (`histories`, oldest first) as its exclude list on
    personalized rows (search, pre-query); similar-item (an item page) and suggest rows exclude
    nothing."""
    rows = histories if task in (Task.SEARCH, Task.PREQUERY) else [np.zeros(0, dtype=np.int64)] * len(histories)
    lengths = torch.tensor([len(h) for h in rows], dtype=torch.int64)
    exclude = torch.zeros(len(rows), max([1, *(len(h) for h in rows)]), dtype=torch.int64)
    for i, h in enumerate(rows):
        exclude[i, : len(h)] = torch.as_tensor(np.asarray(h, dtype=np.int64))
    return replace(request, exclude=exclude, exclude_lengths=lengths)


def hide_excluded(scores: torch.Tensor, task: Task, request: RankRequest) -> torch.Tensor:
    """-inf for ids never ranked (padding 0, OOV) and, on item rows, for the ids the request must not
    be shown (scoring.hidden_ids: the rule of the exported graph)."""
    scores = scores.clone()
    scores[:, 0] = -torch.inf
    scores[:, -1] = -torch.inf
    if task == QueryTask.SUGGEST:  # a suggestion may repeat a past search: nothing is filtered
        return scores
    hidden = hidden_ids(request.task, request.history, request.history_lengths, request.source_item,
                        request.exclude, request.exclude_lengths)
    scores[:, :-1] = scores[:, :-1].masked_fill(hidden_catalogue(hidden.to(scores.device), scores.shape[1] - 2),
                                                -torch.inf)
    return scores


def filter_seen(scores: torch.Tensor, task: Task, request: RankRequest, histories: list[np.ndarray]) -> torch.Tensor:
    """hide_excluded for the request that carries the users' whole `histories` as exclude lists."""
    return hide_excluded(scores, task, with_seen(task, request, histories))


def evaluate_task(scorer: Scorer, task: Task, cases: EvalCases, builder: RequestBuilder,
                  ks=DEFAULT_KS, batch_size: int = 512, max_users: int | None = None,
                  num_bootstrap: int = 1000, seed: int = 0, queries: str = "all", progress: bool = False,
                  prefix_chars: int = 0) -> dict:
    """Metrics (mean + 95% CI) of one scorer on one task; `max_users` evaluates a fixed random
    subset (for quick validation during training), None = every user; `queries` is the search
    query pool (`zero_shot`: queries of held-out attribute names only). `progress`: a bar of the
    users ranked (stderr, terminals only). Suggest: the users whose next search has a query
    (query_catalogue.suggest_cases), its query id the target; `query_coverage` = the share of them
    whose target is in the catalogue (the ceiling of every recall). `prefix_chars` > 0 (suggest):
    the user has typed the first that many characters of the next query, and only the catalogue
    queries completing that prefix are ranked (the scorer's order among them)."""
    if prefix_chars and task != QueryTask.SUGGEST:
        raise ValueError("a typed prefix applies to suggest only")
    prefixes = None
    if task == QueryTask.SUGGEST:
        cases = suggest_cases(builder.data, cases, builder.zero_shot_modulus)
        if prefix_chars:
            prefixes = typed_prefixes(builder.data, cases, builder.zero_shot_modulus, prefix_chars)
    idx = np.arange(len(cases))
    if max_users is not None and max_users < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_users, replace=False))
    ranks, covered = [], 0
    bar = tqdm(total=len(idx), desc=f"{getattr(scorer, 'name', 'scorer')} {TASK_NAMES[task]}", unit="user",
               disable=None if progress else True, leave=False)
    for start in range(0, len(idx), batch_size):
        b = idx[start: start + batch_size]
        bar.update(len(b))
        histories = [cases.histories[i] for i in b]
        request = with_seen(task, builder.build(task, cases.users[b], histories, cases.targets[b], queries=queries),
                            histories)
        scores = hide_excluded(scorer.scores(task, request), task, request)
        if prefixes is not None:
            scores = scores.masked_fill(~builder.queries.prefix_mask([prefixes[i] for i in b]), -torch.inf)
        targets = cases.targets[b]
        if task == QueryTask.SUGGEST:  # id 0 (not in the catalogue) scores -inf: a miss
            targets = builder.suggest_targets(cases.users[b], targets)
            covered += int((targets > 0).sum())
        ranks.append(target_ranks(scores, torch.from_numpy(targets)).numpy())
    bar.close()
    per_user = metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0), list(ks))
    result = summarize(per_user, num_bootstrap=num_bootstrap, seed=seed)
    result["num_users"] = int(len(idx))
    if task == QueryTask.SUGGEST:
        result["query_coverage"] = covered / max(len(idx), 1)
    return result


ZERO_SHOT = "search_zero_shot"


def evaluate_all(scorers: list[Scorer], cases: EvalCases, builder: RequestBuilder, **kwargs) -> dict:
    """{task name: {scorer name: metrics}} for every scorer on every task it supports, plus
    `search_zero_shot` (the users whose held-out-names query is non-empty, docs/PROTOCOL.md) when the
    builder holds names out."""
    out: dict[str, dict] = {}
    for task in (*Task, *(QueryTask if builder.queries is not None else ())):
        for scorer in scorers:
            if task in scorer.tasks:
                out.setdefault(TASK_NAMES[task], {})[scorer.name] = evaluate_task(scorer, task, cases, builder, **kwargs)
    zero_shot = builder.zero_shot_cases(cases) if builder.zero_shot_modulus else None
    if zero_shot is not None and len(zero_shot):
        for scorer in scorers:
            if Task.SEARCH in scorer.tasks:
                out.setdefault(ZERO_SHOT, {})[scorer.name] = evaluate_task(
                    scorer, Task.SEARCH, zero_shot, builder, queries="zero_shot", **kwargs)
    return out
