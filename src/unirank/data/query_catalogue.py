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
        self._completions: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def id_of(self, text: str) -> int:
        """The query's id, 0 when it is not in the catalogue."""
        return self._ids.get(text, 0)

    def completions(self, prefix: str) -> np.ndarray:
        """Ids of the queries that start with `prefix` (characters; "" = every query), ascending."""
        if prefix not in self._completions:
            self._completions[prefix] = np.array([i + 1 for i, t in enumerate(self.texts) if t.startswith(prefix)],
                                                 dtype=np.int64)
        return self._completions[prefix]

    def prefix_mask(self, prefixes: list[str]) -> torch.Tensor:
        """Bool [B, len + 2]: True where the query id completes the row's typed prefix."""
        mask = torch.zeros(len(prefixes), len(self.texts) + 2, dtype=torch.bool)
        for row, prefix in enumerate(prefixes):
            mask[row, torch.from_numpy(self.completions(prefix))] = True
        return mask

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


def typed_prefixes(data: InteractionData, cases: EvalCases, modulus: int, chars: int) -> list[str]:
    """The first `chars` characters of each case's next query (the whole query when shorter): what
    the user has typed when the suggestions are asked for. 0 = nothing typed."""
    if chars < 0:
        raise ValueError(f"prefix length must be >= 0, got {chars}")
    if chars == 0:
        return [""] * len(cases)
    return [suggest_query(data, int(u), int(t), modulus)[:chars] for u, t in zip(cases.users, cases.targets)]


def suggest_cases(data: InteractionData, cases: EvalCases, modulus: int) -> EvalCases:
    """The users whose next search has a query (non-empty `suggest_query` of their target)."""
    keep = np.array([bool(suggest_query(data, int(u), int(t), modulus)) for u, t in zip(cases.users, cases.targets)],
                    dtype=bool)
    idx = np.flatnonzero(keep)
    return EvalCases(cases.users[idx], [cases.histories[i] for i in idx], cases.targets[idx])
