"""The query catalogue of the suggest task: every distinct query the protocol builds for training,
with its training frequency. Built from the training part of the split only (the validation and
test targets' queries never count), in a deterministic order: most frequent first, ties by text."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from unirank.data.datasets import InteractionData
from unirank.data.examples import EvalCases, Split, pad, suggest_query
from unirank.model.tokenizer import Tokenizer


@dataclass
class QueryCatalogue:
    """Query id = position in `texts` + 1 (0 is padding, len(texts) + 1 the unused OOV slot, as for items)."""

    texts: list[str]
    counts: np.ndarray  # [len(texts) + 2] training frequency per query id (0 on padding / OOV)

    def __post_init__(self) -> None:
        self._ids = {text: i + 1 for i, text in enumerate(self.texts)}

    def __len__(self) -> int:
        return len(self.texts)

    def id_of(self, text: str) -> int:
        """The query's id, 0 when it is not in the catalogue."""
        return self._ids.get(text, 0)

    def token_ids(self, tokenizer: Tokenizer, max_query_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([len + 2, Q] token ids, [len + 2] lengths) per query id, rows 0 and len + 1 empty."""
        rows = [np.zeros(0, dtype=np.int64)] + [np.array(tokenizer.encode(t, max_length=max_query_len), dtype=np.int64)
                                                 for t in self.texts] + [np.zeros(0, dtype=np.int64)]
        return pad(rows, max_query_len)

    def frequencies(self) -> torch.Tensor:
        """[len + 2] share of the training queries per id (the sampled softmax's logQ)."""
        return torch.from_numpy(self.counts / max(self.counts.sum(), 1)).float()


def build_query_catalogue(data: InteractionData, split: Split, modulus: int) -> QueryCatalogue:
    """Every training position (user, s_i), i <= n - 2, gives one query; empty queries (a target
    with only held-out names) give none."""
    counts = Counter()
    for user, seq in zip(split.users, split.train):
        counts.update(q for q in (suggest_query(data, int(user), int(item), modulus) for item in seq) if q)
    texts = sorted(counts, key=lambda t: (-counts[t], t))
    return QueryCatalogue(texts, np.array([0] + [counts[t] for t in texts] + [0], dtype=np.int64))


def suggest_cases(data: InteractionData, cases: EvalCases, modulus: int) -> EvalCases:
    """The users whose next search has a query (non-empty `suggest_query` of their target)."""
    keep = np.array([bool(suggest_query(data, int(u), int(t), modulus)) for u, t in zip(cases.users, cases.targets)],
                    dtype=bool)
    idx = np.flatnonzero(keep)
    return EvalCases(cases.users[idx], [cases.histories[i] for i in idx], cases.targets[idx])
