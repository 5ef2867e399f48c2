"""From user sequences to model inputs: the leave-one-out split, the protocol's search queries,
evaluation cases per task and the training batches of every task."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from unirank.model.request import QueryTask, RankRequest, Task
from unirank.model.tokenizer import Tokenizer, WordPieceTokenizer, WordTokenizer, split_words
from unirank.data.datasets import InteractionData


@dataclass
class EvalCases:
    """One evaluation target per user: `histories[u]` are the items before `targets[u]`."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Split:
    train: list[np.ndarray]  # per user (same order as `users`): s_1 .. s_{n-2}
    users: np.ndarray  # dataset user indices kept (>= 3 interactions)
    valid: EvalCases  # target s_{n-1}
    test: EvalCases  # target s_n


def leave_one_out_split(sequences: list[np.ndarray], min_length: int = 3) -> Split:
    """Chronological leave-one-out: test = last item, validation = second to last, training = the
    rest. Users with fewer than `min_length` (>= 3) interactions cannot give all three and are dropped."""
    if min_length < 3:
        raise ValueError("leave-one-out needs min_length >= 3 (train, validation and test items)")
    users = np.array([u for u, s in enumerate(sequences) if len(s) >= min_length], dtype=np.int64)
    seqs = [np.asarray(sequences[u]) for u in users]
    return Split(
        train=[s[:-2] for s in seqs], users=users,
        valid=EvalCases(users, [s[:-2] for s in seqs], np.array([s[-2] for s in seqs], dtype=np.int64)),
        test=EvalCases(users, [s[:-1] for s in seqs], np.array([s[-1] for s in seqs], dtype=np.int64)),
    )


def item_counts(train: list[np.ndarray], num_items: int) -> np.ndarray:
    """[num_items + 2] int64: how many times each id occurs in the training sequences."""
    flat = np.concatenate(train) if len(train) else np.zeros(0, dtype=np.int64)
    return np.bincount(flat.astype(np.int64), minlength=num_items + 2)[: num_items + 2]


QUERY_POOLS = ("all", "train", "zero_shot")


def held_out_name(name: str, modulus: int) -> bool:
    """The protocol's zero-shot rule, the same on every dataset: an attribute name is held out of
    every training query when crc32(name) % modulus == 0 (modulus 0: nothing is held out)."""
    return modulus > 0 and zlib.crc32(name.encode()) % modulus == 0


def build_search_query(data: InteractionData, user: int, item: int, pool: str = "all", modulus: int = 0) -> str:
    """The protocol's query for (user, target item): 1..3 of the target's attribute names picked by
    an RNG seeded with (user id, item id), lowercased, split on non-letters, duplicate words dropped.
    Never the title text (that would make search a lookup). `pool` restricts the names drawn from:
    `train` skips the held-out names (`held_out_name`), `zero_shot` uses only them."""
    if pool not in QUERY_POOLS:
        raise ValueError(f"query pool {pool!r}: expected one of {QUERY_POOLS}")
    attrs = list(data.item_attributes[item])
    if pool != "all":
        attrs = [a for a in attrs if held_out_name(data.attribute_names[a], modulus) == (pool == "zero_shot")]
    if not attrs:
        return ""
    user_seed = zlib.crc32(data.user_keys[user].encode())
    rng = np.random.default_rng([user_seed, int(item)])
    k = int(rng.integers(1, min(3, len(attrs)) + 1))
    picked = sorted(rng.choice(len(attrs), size=k, replace=False))
    words = [w for a in picked for w in split_words(data.attribute_names[attrs[a]])]
    return " ".join(dict.fromkeys(words))


def suggest_query(data: InteractionData, user: int, item: int, modulus: int) -> str:
    """The suggest target for (user, next item): the protocol's search query drawn from the names a
    training query may use, the only ones a catalogue of training queries can hold."""
    return build_search_query(data, user, item, "train", modulus)


def item_content_text(data: InteractionData, item: int) -> str:
    """Title words + attribute names: the text the item tower's word bag and BM25 see."""
    return f"{data.item_text[item]} {data.item_attribute_text(item)}".strip()


def item_lexical_rows(data: InteractionData, tokenizer: Tokenizer, field: str) -> list[list[int]]:
    """Per id 0..num_items + 1, the token ids (repeats kept: term frequency) of the item's lexical
    field (model.lexical): its attribute names (`names`) or title + names (`title+names`)."""
    texts = {"names": data.item_attribute_text, "title+names": lambda item: item_content_text(data, item)}
    if field not in texts:
        raise ValueError(f"lexical field must be one of {sorted(texts)}, got {field!r}")
    return [[]] + [tokenizer.encode(texts[field](i)) for i in range(1, data.num_items + 1)] + [[]]


def fit_tokenizer(data: InteractionData, kind: str = "word") -> Tokenizer:
    """`word`: a vocabulary fitted on the catalogue's content; `wordpiece`: the text encoder's."""
    if kind == "wordpiece":
        return WordPieceTokenizer()
    return WordTokenizer.fit(item_content_text(data, i) for i in range(1, data.num_items + 1))


def item_word_ids(data: InteractionData, tokenizer: Tokenizer) -> list[list[int]]:
    return [[]] + [tokenizer.encode(item_content_text(data, i), unique=True) for i in range(1, data.num_items + 1)]


def pad(rows: list[np.ndarray], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned zero padding: ([B, W] int64, lengths [B]). Rows longer than W keep their tail."""
    width = max([len(r) for r in rows] + [1]) if width is None else width
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        r = np.asarray(r)[-width:] if width else np.asarray(r)[:0]
        out[i, : len(r)] = r
        lengths[i] = len(r)
    return torch.from_numpy(out), torch.from_numpy(lengths)


class RequestBuilder:
    """Turns (task, user, history, target) into the request schema with one tokenizer and limits."""

    def __init__(self, data: InteractionData, tokenizer: Tokenizer, max_history: int, max_query_len: int,
                 zero_shot_modulus: int = 0, queries=None):
        """`queries`: the suggest task's QueryCatalogue (data/query_catalogue.py), None = no suggest."""
        self.data, self.tokenizer = data, tokenizer
        self.max_history, self.max_query_len = max_history, max_query_len
        self.zero_shot_modulus = zero_shot_modulus
        self.queries = queries

    def suggest_targets(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Query ids of the users' next searches (0: empty, or not in the catalogue)."""
        if self.queries is None:
            raise ValueError("suggest needs a query catalogue (train.tasks with suggest)")
        return np.array([self.queries.id_of(suggest_query(self.data, int(u), int(t), self.zero_shot_modulus))
                         for u, t in zip(users, items)], dtype=np.int64)

    def query_ids(self, user: int, item: int, pool: str = "all") -> np.ndarray:
        text = build_search_query(self.data, user, item, pool, self.zero_shot_modulus)
        return np.array(self.tokenizer.encode(text, max_length=self.max_query_len), dtype=np.int64)

    def zero_shot_cases(self, cases: EvalCases) -> EvalCases:
        """The users whose query built from held-out names only is non-empty (the zero-shot set)."""
        keep = np.array([len(self.query_ids(int(u), int(t), "zero_shot")) > 0
                         for u, t in zip(cases.users, cases.targets)], dtype=bool)
        idx = np.flatnonzero(keep)
        return EvalCases(cases.users[idx], [cases.histories[i] for i in idx], cases.targets[idx])

    def build(self, task: Task, users: np.ndarray, histories: list[np.ndarray], targets: np.ndarray,
              width: int | None = None, queries: str = "all") -> RankRequest:
        """Padded request; history width = `width` (default max_history), keeping the newest items;
        `queries` is the pool search queries are drawn from (`build_search_query`)."""
        b = len(users)
        empty = np.zeros(0, dtype=np.int64)
        if task == Task.SIMILAR:
            source = torch.tensor([int(h[-1]) if len(h) else 0 for h in histories], dtype=torch.int64)
            histories = [empty] * b
        else:
            source = torch.zeros(b, dtype=torch.int64)
        rows = [self.query_ids(u, t, queries) for u, t in zip(users, targets)] if task == Task.SEARCH else [empty] * b
        history, history_lengths = pad(histories, self.max_history if width is None else width)
        query, query_lengths = pad(rows, self.max_query_len)
        return RankRequest(task=torch.full((b,), int(task), dtype=torch.int64), history=history,
                           history_lengths=history_lengths, query=query, query_lengths=query_lengths,
                           source_item=source)


@dataclass
class TrainBatch:
    """One training step: rows of every trained task in ONE request (the task is an input, so the
    unified model takes mixed batches). `targets` [B, 1 + W] is aligned with the model's outputs
    after the TASK token: pre-query rows predict every next item, search / similar-item rows only at
    their last position; 0 = no target."""

    request: RankRequest
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> "TrainBatch":
        return TrainBatch(self.request.to(device), self.targets.to(device, non_blocking=True))


class TrainingExamples:
    """Per-epoch training batches from the training part of the split only. An epoch visits every
    user once; each step takes a group of users of similar sequence length (little padding) and
    gives each trained task one row per user: pre-query predicts every next item of the user's
    window, search one random position (with the protocol's query), similar-item one random
    consecutive pair, suggest one random position whose target is the query of that search (rows
    whose query is empty are dropped; suggest needs the builder's query catalogue)."""

    def __init__(self, split: Split, builder: RequestBuilder, batch_size: int, seed: int,
                 tasks: tuple[Task, ...] = tuple(Task)):
        self.builder, self.batch_size, self.tasks = builder, batch_size, tasks
        self.rng = np.random.default_rng(seed)
        self.users = split.users
        self.seqs = split.train
        self.lengths = np.array([len(s) for s in self.seqs], dtype=np.int64)
        self.nonempty = np.flatnonzero(self.lengths >= 1)

    def steps_per_epoch(self) -> int:
        return max(1, int(np.ceil(len(self.nonempty) / self.batch_size)))

    def epoch(self) -> Iterator[TrainBatch]:
        # Sort by length (random among equals), cut into batches, shuffle the batch order.
        order = self.nonempty[np.lexsort((self.rng.random(len(self.nonempty)), self.lengths[self.nonempty]))]
        groups = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for g in self.rng.permutation(len(groups)):
            parts = [self._rows(task, groups[g]) for task in self.tasks]
            parts = [p for p in parts if p is not None]
            if parts:
                yield self._concat(parts)

    def _rows(self, task: Task, rows: np.ndarray):
        width = min(self.builder.max_history, int(self.lengths[rows].max()))
        if task == Task.PREQUERY:
            windows = [self.seqs[i][-(width + 1):] for i in rows]
            req = self.builder.build(Task.PREQUERY, self.users[rows], [w[:-1] for w in windows],
                                     np.zeros(len(rows), dtype=np.int64), width=width)
            return req, pad(windows, width + 1)[0]
        if task == Task.SIMILAR:
            rows = rows[self.lengths[rows] >= 2]
            if len(rows) == 0:
                return None
            pos = 1 + (self.rng.random(len(rows)) * (self.lengths[rows] - 1)).astype(np.int64)
        else:
            pos = (self.rng.random(len(rows)) * self.lengths[rows]).astype(np.int64)
        histories = [self.seqs[r][:p] for r, p in zip(rows, pos)]
        targets = np.array([self.seqs[r][p] for r, p in zip(rows, pos)], dtype=np.int64)
        if task == QueryTask.SUGGEST:  # the target is the query of the search at that position
            targets = self.builder.suggest_targets(self.users[rows], targets)
            found = np.flatnonzero(targets > 0)
            if len(found) == 0:
                return None
            rows, targets, histories = rows[found], targets[found], [histories[i] for i in found]
        req = self.builder.build(task, self.users[rows], histories, targets, width=width, queries="train")
        # The target sits at the row's last position: index = number of history tokens.
        aligned = torch.zeros(len(rows), width + 1, dtype=torch.int64)
        aligned[torch.arange(len(rows)), req.history_lengths] = torch.from_numpy(targets)
        return req, aligned

    @staticmethod
    def _concat(parts) -> TrainBatch:
        reqs, targets = zip(*parts)
        width = max(r.history.shape[1] for r in reqs)
        grow = lambda t, w: torch.nn.functional.pad(t, (0, w - t.shape[1]))  # noqa: E731
        request = RankRequest(
            task=torch.cat([r.task for r in reqs]), history=torch.cat([grow(r.history, width) for r in reqs]),
            history_lengths=torch.cat([r.history_lengths for r in reqs]),
            query=torch.cat([r.query for r in reqs]), query_lengths=torch.cat([r.query_lengths for r in reqs]),
            source_item=torch.cat([r.source_item for r in reqs]))
        return TrainBatch(request, torch.cat([grow(t, width + 1) for t in targets]))
