"""Non-neural baselines shown beside the model: popularity (all item tasks), item-to-item
co-occurrence kNN (similar-item), next-item transitions from the last history item (pre-query), BM25 over item text + attribute names (search), text kNN
over the frozen text-encoder vectors (similar-item / pre-query; the content-only cold-start bar),
and for suggest the most popular queries and the queries made of the last item's attribute names.

Each is a scorer: `scores(task, request) -> [B, num_items + 2]` over the whole id space, the same
interface the model's scorer has, so every method goes through one evaluation path."""
from __future__ import annotations

import bm25s
import numpy as np
import scipy.sparse as sp
import torch

from unirank.model.request import QueryTask, RankRequest, Task
from unirank.model.tokenizer import Tokenizer, split_words
from unirank.data.datasets import InteractionData
from unirank.data.examples import item_content_text
from unirank.data.query_catalogue import QueryCatalogue


def _padded_ids(num_items: int) -> int:
    return num_items + 2


class Popularity:
    name = "popularity"
    tasks = (Task.SEARCH, Task.SIMILAR, Task.PREQUERY)

    def __init__(self, train: list[np.ndarray], num_items: int):
        counts = np.bincount(np.concatenate(train) if train else np.zeros(0, dtype=np.int64),
                             minlength=_padded_ids(num_items))[: _padded_ids(num_items)]
        self.counts = torch.from_numpy(counts.astype(np.float32))

    def scores(self, task: Task, request: RankRequest) -> torch.Tensor:
        return self.counts.expand(request.batch_size, -1)


class ItemKNN:
    """Cosine similarity of items' user-occurrence vectors in the training data; ties broken by
    popularity so a source item with no co-occurrences still gets a sensible list."""

    name = "item-knn"
    tasks = (Task.SIMILAR,)

    def __init__(self, train: list[np.ndarray], num_items: int):
        rows = np.concatenate([np.full(len(s), u) for u, s in enumerate(train)]) if train else np.zeros(0)
        cols = np.concatenate(train) if train else np.zeros(0)
        n = _padded_ids(num_items)
        ui = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(train), n))
        ui.data[:] = 1.0  # binary: repeated interactions count once
        norms = np.sqrt(np.asarray(ui.multiply(ui).sum(0)).ravel()) + 1e-9
        self.item_user = ui.T.tocsr().multiply(1.0 / norms[:, None]).tocsr()
        pop = np.asarray(ui.sum(0)).ravel()
        self.tiebreak = torch.from_numpy((pop / (pop.max() + 1.0) * 1e-6).astype(np.float32))

    def scores(self, task: Task, request: RankRequest) -> torch.Tensor:
        src = request.source_item.numpy()
        sims = (self.item_user[src] @ self.item_user.T).toarray().astype(np.float32)
        return torch.from_numpy(sims) + self.tiebreak


class LastItemTransitions:
    """Pre-query: how often each item directly followed the user's last history item in the training
    sequences (a first-order Markov chain, the sequential bar beside the model); ties, and users
    whose last item was never followed, by popularity."""

    name = "last-item-transitions"
    tasks = (Task.PREQUERY,)

    def __init__(self, train: list[np.ndarray], num_items: int):
        n = _padded_ids(num_items)
        pairs = [(s[:-1], s[1:]) for s in train if len(s) > 1]
        rows = np.concatenate([a for a, _ in pairs]) if pairs else np.zeros(0, dtype=np.int64)
        cols = np.concatenate([b for _, b in pairs]) if pairs else np.zeros(0, dtype=np.int64)
        self.next = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
        self.next.sum_duplicates()
        pop = Popularity(train, num_items).counts
        self.tiebreak = pop / (pop.max() + 1.0) * 1e-3
        self.num_items = num_items

    def scores(self, task: Task, request: RankRequest) -> torch.Tensor:
        last = request.history.gather(1, (request.history_lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        last = torch.where((request.history_lengths > 0) & (last <= self.num_items), last, torch.zeros_like(last))
        return torch.from_numpy(self.next[last.numpy()].toarray()) + self.tiebreak


class TextKNN:
    """Cosine of text-encoder vectors: similar-item from the source item, pre-query from the user's
    most recent history item. Uses content only, so it ranks items no one has interacted with."""

    name = "text-knn"
    tasks = (Task.SIMILAR, Task.PREQUERY)

    def __init__(self, item_text: torch.Tensor):
        self.vectors = torch.nn.functional.normalize(item_text.float(), dim=-1)  # zero rows stay zero

    def scores(self, task: Task, request: RankRequest) -> torch.Tensor:
        if task == Task.SIMILAR:
            anchor = request.source_item
        else:
            last = (request.history_lengths - 1).clamp(min=0)
            anchor = request.history.gather(1, last.unsqueeze(1)).squeeze(1)
        return self.vectors[anchor.clamp(0, len(self.vectors) - 1)] @ self.vectors.T


class BM25:
    """BM25 (bm25s) with the query words against each item's title words + attribute names
    (`fields="title+names"`, named "bm25") or its attribute names only (`fields="names"`,
    "bm25-names"); non-personalized. Queries are read back from token ids with the model's tokenizer."""

    tasks = (Task.SEARCH,)
    FIELDS = {"title+names": ("bm25", item_content_text),
              "names": ("bm25-names", lambda data, item: data.item_attribute_text(item))}

    def __init__(self, data: InteractionData, tokenizer: Tokenizer, fields: str = "title+names"):
        if fields not in self.FIELDS:
            raise ValueError(f"BM25 fields must be one of {sorted(self.FIELDS)}, got {fields!r}")
        self.name, text = self.FIELDS[fields]
        self.num_items, self.tokenizer = data.num_items, tokenizer
        corpus = [split_words(text(data, i)) or ["_"] for i in range(1, data.num_items + 1)]
        self.index = bm25s.BM25()
        self.index.index(corpus, show_progress=False)

    def scores(self, task: Task, request: RankRequest) -> torch.Tensor:
        out = torch.zeros(request.batch_size, _padded_ids(self.num_items))
        for b in range(request.batch_size):
            ids = request.query[b, : int(request.query_lengths[b])].tolist()
            words = self.tokenizer.words_of(ids)
            if words:
                out[b, 1: self.num_items + 1] = torch.from_numpy(self.index.get_scores(words).astype(np.float32))
        return out


class QueryPopularity:
    """Suggest: the catalogue's queries by training frequency, the same list for everyone."""

    name = "popular-queries"
    tasks = (QueryTask.SUGGEST,)

    def __init__(self, queries: QueryCatalogue):
        self.counts = torch.from_numpy(queries.counts.astype(np.float32))

    def scores(self, task: QueryTask, request: RankRequest) -> torch.Tensor:
        return self.counts.expand(request.batch_size, -1)


class LastItemQueries:
    """Suggest: the queries made of the user's last history item's attribute names first (score =
    the share of the query's words among that item's attribute-name words), ties by training
    frequency; a user with no history gets the popular queries."""

    name = "last-item-queries"
    tasks = (QueryTask.SUGGEST,)

    def __init__(self, data: InteractionData, queries: QueryCatalogue):
        vocabulary: dict[str, int] = {}
        rows = [[]] + [[vocabulary.setdefault(w, len(vocabulary)) for w in dict.fromkeys(t.split())]
                       for t in queries.texts] + [[]]
        self.query_words = _binary(rows, len(vocabulary) + 1).T.tocsr()  # [V, Q + 2]
        self.query_sizes = np.maximum(np.array([len(r) for r in rows], dtype=np.float32), 1.0)
        item_rows = [[vocabulary[w] for w in dict.fromkeys(split_words(data.item_attribute_text(i))) if w in vocabulary]
                     for i in range(data.num_items + 1)]
        self.item_words = _binary(item_rows, len(vocabulary) + 1)  # [num_items + 1, V]
        self.num_items = data.num_items
        counts = queries.counts.astype(np.float64)
        self.tiebreak = torch.from_numpy((counts / (counts.max() + 1.0) * 1e-3).astype(np.float32))

    def scores(self, task: QueryTask, request: RankRequest) -> torch.Tensor:
        last = request.history.gather(1, (request.history_lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        last = torch.where((request.history_lengths > 0) & (last <= self.num_items), last, torch.zeros_like(last))
        shared = (self.item_words[last.numpy()] @ self.query_words).toarray().astype(np.float32)
        return torch.from_numpy(shared / self.query_sizes) + self.tiebreak


def _binary(rows: list[list[int]], columns: int) -> sp.csr_matrix:
    indices = np.array([c for r in rows for c in r], dtype=np.int64)
    indptr = np.cumsum([0] + [len(r) for r in rows])
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(len(rows), columns))
