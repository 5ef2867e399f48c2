"""Lexical match in the search score: score(query, item) = <context, item> + scale * BM25(query, item).

A 64-d dot product cannot tell thousands of exact names apart; BM25 can, and it needs no training,
so it also carries names no training query used (zero-shot) and items without an id row (cold,
new). The ranker adds it to the search rows only, and `scale` is learned with the rest of the
model by the same softmax loss, so the learned part of the score is trained as a complement to
the lexical one, not on its own.

BM25 (Lucene variant, as bm25s): idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)) and the weight
of term t in item d is idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)) (Lucene drops the
constant k1 + 1 of the numerator), over the model tokenizer's ids of the item's field
(`model.lexical`: its attribute names, or title + names).
A query term counts once. The per-item weights are a padded [num_items + 2, width] table of
(token id, weight) pairs: rows 0 and num_items + 1 (padding, OOV) are empty. Eager PyTorch scores
the catalogue with a sparse (COO) [items, vocabulary] matrix. ONNX has no sparse product, so the
export form (`export_form()`) is an inverted index: each token's postings (item, weight), sorted
by token and cut into chunks of CHUNK slots, with each token's first chunk and chunk count. A query
reads the chunks of its distinct tokens only (NonZero keeps the existing ones) and scatter-adds
their weights into the items, so a search row costs the postings of its own terms, not the
catalogue's term count (107,711 on Amazon Beauty, which a one-hot gather over every term paid on
every search row).
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from unirank.model.tokenizer import OOV_TOKEN_ID, PAD_TOKEN_ID

K1, B = 1.5, 0.75
CHUNK = 16  # postings per chunk of the export form's inverted index


def bm25_idf(docs: list[list[int]], vocab_size: int) -> torch.Tensor:
    """[vocab_size] idf of each token over the documents (the catalogue items' rows)."""
    df = Counter(t for row in docs for t in set(row))
    n = max(len(docs), 1)
    idf = torch.zeros(vocab_size)
    for token, count in df.items():
        idf[token] = math.log(1.0 + (n - count + 0.5) / (count + 0.5))
    return idf


def term_weights(rows: list[list[int]], idf: torch.Tensor, avgdl: float, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([len(rows), width] token ids, [len(rows), width] BM25 weights) of each row's distinct tokens
    (0 = empty slot); the corpus statistics `idf` and `avgdl` are given, so rows added later (new
    items) are weighed exactly as the training catalogue was."""
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    weights = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        counts = Counter(t for t in row if t not in (PAD_TOKEN_ID, OOV_TOKEN_ID) and t < len(idf))
        if len(counts) > width:
            raise ValueError(f"an item has {len(counts)} distinct lexical tokens, the table holds {width}")
        norm = K1 * (1.0 - B + B * len(row) / max(avgdl, 1e-6))
        for j, (token, tf) in enumerate(sorted(counts.items())):
            tokens[i, j] = token
            weights[i, j] = float(idf[token]) * tf / (tf + norm)
    return tokens, weights


def table_width(rows: list[list[int]]) -> int:
    return max([len({t for t in row if t not in (PAD_TOKEN_ID, OOV_TOKEN_ID)}) for row in rows] + [1])


class LexicalMatch(nn.Module):
    """BM25 of a query's token ids against every item (or given candidates), times a learned scale.

    `rows`: per id 0..num_items + 1, the token ids of the item's lexical field (duplicates count as
    term frequency; rows 0 and the last are empty). None leaves zero placeholders of the configured
    shape ([num_items + 2, width], [vocab_size]), to be filled by load_state_dict."""

    def __init__(self, num_items: int, vocab_size: int, width: int, rows: list[list[int]] | None = None):
        super().__init__()
        self.num_items, self.vocab_size = num_items, vocab_size
        self.gather = False  # the export form (export_form()): no sparse tensors in the graph
        if rows is not None:
            if len(rows) != num_items + 2:
                raise ValueError(f"lexical rows: expected {num_items + 2} (ids 0..num_items + 1), got {len(rows)}")
            docs = rows[1: num_items + 1]
            avgdl = sum(len(r) for r in docs) / max(len(docs), 1)
            idf = bm25_idf(docs, vocab_size)
            tokens, weights = term_weights(rows, idf, avgdl, width)
        else:
            avgdl, idf = 1.0, torch.zeros(vocab_size)
            tokens, weights = torch.zeros(num_items + 2, width, dtype=torch.int64), torch.zeros(num_items + 2, width)
        self.register_buffer("idf", idf)
        self.register_buffer("avgdl", torch.tensor(float(avgdl)))
        self.register_buffer("tokens", tokens)
        self.register_buffer("weights", weights)
        self.scale = nn.Parameter(torch.ones(()))
        self._matrix: torch.Tensor | None = None

    def _query_hot(self, query: torch.Tensor, query_lengths: torch.Tensor) -> torch.Tensor:
        """[B, vocab_size] 1 at each distinct valid query token (padding, OOV and positions past the
        length never count)."""
        valid = torch.arange(query.shape[1], device=query.device).unsqueeze(0) < query_lengths.unsqueeze(1)
        ids = torch.where(valid & (query >= 0) & (query < self.vocab_size), query, torch.zeros_like(query))
        hot = torch.zeros(query.shape[0], self.vocab_size, device=query.device, dtype=self.weights.dtype)
        hot = hot.scatter(1, ids, torch.ones_like(ids, dtype=hot.dtype))
        keep = torch.ones(self.vocab_size, device=query.device, dtype=hot.dtype)
        keep[PAD_TOKEN_ID] = 0.0
        keep[OOV_TOKEN_ID] = 0.0
        return hot * keep

    def matrix(self) -> torch.Tensor:
        """The sparse [num_items + 2, vocab_size] weight matrix (cached; rebuilt when the table changes
        device or size)."""
        m = self._matrix
        if m is None or m.device != self.weights.device or m.shape[0] != self.weights.shape[0]:
            rows = torch.arange(self.tokens.shape[0], device=self.tokens.device).unsqueeze(1).expand_as(self.tokens)
            used = self.weights != 0
            index = torch.stack([rows[used], self.tokens[used]])
            m = torch.sparse_coo_tensor(index, self.weights[used], (self.tokens.shape[0], self.vocab_size),
                                        check_invariants=True).coalesce()
            self._matrix = m
        return m

    def forward(self, query: torch.Tensor, query_lengths: torch.Tensor,
                candidates: torch.Tensor | None = None) -> torch.Tensor:
        """scale * BM25: [B, C] for candidate ids [B, C] (ids outside 1..num_items score 0), or
        [B, num_items + 2] over the whole id space."""
        hot = self._query_hot(query, query_lengths)
        if candidates is not None:
            known = (candidates >= 1) & (candidates <= self.num_items)
            cand = torch.where(known, candidates, torch.zeros_like(candidates))
            tokens, weights = self.tokens[cand], self.weights[cand]  # [B, C, W]
            matched = hot.gather(1, tokens.flatten(1)).view(tokens.shape)  # flatten: also for 0 rows
            return self.scale * (matched * weights).sum(-1)
        if self.gather:
            return self.scale * self._postings_scores(query, query_lengths)
        return self.scale * torch.sparse.mm(self.matrix(), hot.T).T

    def _distinct_terms(self, query: torch.Tensor, query_lengths: torch.Tensor) -> torch.Tensor:
        """[B, Q] the query's valid token ids, each once (repeats, padding, OOV and ids outside the
        vocabulary become 0, a token without postings)."""
        valid = torch.arange(query.shape[1], device=query.device).unsqueeze(0) < query_lengths.unsqueeze(1)
        ids = torch.where(valid & (query > OOV_TOKEN_ID) & (query < self.vocab_size), query, torch.zeros_like(query))
        ordered, order = ids.sort(dim=1)
        repeat = torch.cat([torch.zeros_like(ordered[:, :1]), (ordered[:, 1:] == ordered[:, :-1]).long()], dim=1)
        return ordered * (1 - repeat)

    def _postings_scores(self, query: torch.Tensor, query_lengths: torch.Tensor) -> torch.Tensor:
        """[B, num_items + 2] BM25 (unscaled) from the inverted index of the export form."""
        terms = self._distinct_terms(query, query_lengths)  # [B, Q]
        steps = torch.arange(self.max_chunks, device=query.device)
        chunks = self.first_chunk[terms].unsqueeze(-1) + steps  # [B, Q, max_chunks]
        used = steps < self.chunk_count[terms].unsqueeze(-1)
        found = torch.nonzero(used.flatten(1))  # [M, 2]: (row, slot) of each chunk a query reads
        chunk = chunks.flatten(1)[found[:, 0], found[:, 1]]
        rows = self.tokens.shape[0]
        target = (found[:, :1] * rows + self.chunk_items[chunk]).flatten()  # [M * CHUNK] in the flat [B * rows]
        out = torch.zeros(query.shape[0] * rows, device=query.device, dtype=self.weights.dtype)
        return out.index_add(0, target, self.chunk_weights[chunk].flatten()).view(query.shape[0], rows)

    def export_form(self) -> None:
        """Switch to the export form: the inverted index of the table's non-empty slots (non-persistent
        buffers; rebuilt by extend). Chunk 0 is empty: tokens without postings point at it."""
        used = self.weights != 0
        items = torch.arange(self.tokens.shape[0], device=self.tokens.device).unsqueeze(1).expand_as(self.tokens)
        tokens, order = self.tokens[used].sort(stable=True)
        items, weights = items[used][order], self.weights[used][order]
        df = torch.bincount(tokens, minlength=self.vocab_size)
        count = (df + CHUNK - 1) // CHUNK  # chunks per token
        first = torch.cumsum(count, 0) - count + 1  # chunk 0 is the empty one
        start = torch.cumsum(df, 0) - df  # each token's first posting
        rank = torch.arange(len(tokens), device=tokens.device) - start[tokens]  # position within the token
        slot = (first[tokens] + rank // CHUNK) * CHUNK + rank % CHUNK
        total = int(count.sum()) + 1
        chunk_items = torch.zeros(total * CHUNK, dtype=torch.int64, device=tokens.device)
        chunk_weights = torch.zeros(total * CHUNK, dtype=self.weights.dtype, device=tokens.device)
        chunk_items[slot], chunk_weights[slot] = items, weights
        self.register_buffer("chunk_items", chunk_items.view(total, CHUNK), persistent=False)
        self.register_buffer("chunk_weights", chunk_weights.view(total, CHUNK), persistent=False)
        self.register_buffer("first_chunk", torch.where(count > 0, first, torch.zeros_like(first)), persistent=False)
        self.register_buffer("chunk_count", count, persistent=False)
        self.max_chunks = max(int(count.max()) if len(count) else 0, 1)
        self.gather = True

    def extend(self, rows: list[list[int]]) -> None:
        """Append items (ids num_items + 1 ..) weighed with the training catalogue's idf and avgdl;
        the OOV row moves to the new last id + 1. For the export form (new items)."""
        width = max(self.tokens.shape[1], table_width(rows))
        tokens, weights = term_weights(rows, self.idf, float(self.avgdl), width)
        pad = width - self.tokens.shape[1]
        old_t = torch.nn.functional.pad(self.tokens, (0, pad))
        old_w = torch.nn.functional.pad(self.weights, (0, pad))
        n = self.num_items
        self.tokens = torch.cat([old_t[: n + 1], tokens.to(old_t.device), old_t[n + 1:]])
        self.weights = torch.cat([old_w[: n + 1], weights.to(old_w.device), old_w[n + 1:]])
        self.num_items = n + len(rows)
        self._matrix = None
        if self.gather:
            self.export_form()
