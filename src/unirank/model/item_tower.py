"""Item tower: item-id embedding + pooled attribute bag + pooled content-word bag (+ semantic-ID
codes + projected text-encoder vector, the LM features), summed.

All sparse lookups go through ONE embedding-bag collection (model/sparse_features.py) so the
planner can shard them: one table per semantic-ID level (`sid_<l>`, feature `item_sid_<l>`) sits
beside the id, attribute and word tables. The word table is shared between item content words and
search-query words (feature `query_words`), so a query word and the same word on an item start
from the same vector. The frozen text-encoder vectors of the items are a dense buffer (not trained)
followed by a trained projection: content reaches items whose ids never appeared in training.

`features()` (buffers only, no weights) turns ids and queries into the jagged batch and `pool()`
looks it up, so the training data path can build the features of a step before the model runs
(the input of a sharded collection's all-to-all); `lookup()` does both.
"""
from __future__ import annotations

import torch
from torch import nn

from unirank.model.sparse_features import EmbeddingTables, JaggedFeatures, TableSpec

ITEM_FEATURES = ("item_id", "item_attributes", "item_words")
_MASK53 = (1 << 53) - 1


def semantic_id_feature(level: int) -> str:
    return f"item_sid_{level}"


def _csr(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
    return offsets, values


def clamp_item_ids(ids: torch.Tensor, num_items: int) -> torch.Tensor:
    """Ids outside [0, num_items] map to the reserved OOV row num_items + 1 (never crash)."""
    return torch.where((ids >= 0) & (ids <= num_items), ids, torch.full_like(ids, num_items + 1))


def gather_csr(offsets: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths and concatenated values of CSR rows `rows` (vectorised, no Python loop)."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    total = int(lengths.sum())
    pos = (torch.arange(total, dtype=torch.int64, device=rows.device)
           - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths, output_size=total))
    return lengths, values[torch.repeat_interleave(starts, lengths, output_size=total) + pos]


def id_dropout_keep(item_ids: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """Bool [U]: which ids keep their id vector this step. A hash of (id, seed), not a draw from the
    RNG: every rank of a sharded run that sees an item makes the same decision for it, so N ranks
    drop exactly what one process drops."""
    x = item_ids * -7046029254386353131 + torch.full_like(item_ids, seed) * -4658895280553007687  # wraps mod 2^64
    x = x ^ (x >> 31)
    x = x * -4265267296055464877
    x = x ^ (x >> 29)
    return (x & _MASK53).double() / float(1 << 53) >= rate


class ItemTower(nn.Module):
    """Maps item ids (any shape) to vectors. Id 0 is padding (zero vector); ids outside
    [1, num_items] use the reserved OOV row num_items + 1.

    `id_dropout`: in training, each item's id vector is dropped with this probability (per step),
    so the content features learn to stand in for ids (cold start).

    LM features (optional): `semantic_id_sizes` [rows per level] turns on one table per level,
    indexed by `item_codes` [num_items + 2, levels] (-1 = no code: padding / OOV rows);
    `text_dim` > 0 adds `text_proj(item_text[id])`, `item_text` [num_items + 2, text_dim] frozen.
    Both are persistent buffers, so a checkpoint carries them and a loaded model needs no encoder.
    """

    def __init__(self, num_items: int, item_attributes: list[list[int]], num_attributes: int,
                 item_words: list[list[int]], num_words: int, dim: int,
                 use_attributes: bool = True, use_words: bool = True, bag_impl: str = "auto",
                 semantic_id_sizes: list[int] | None = None, item_codes: torch.Tensor | None = None,
                 text_dim: int = 0, item_text: torch.Tensor | None = None, id_dropout: float = 0.0):
        super().__init__()
        self.num_items, self.dim = num_items, dim
        self.id_dropout = id_dropout
        self.use_attributes, self.use_words = use_attributes, use_words
        rows = num_items + 2
        self.semantic_id_sizes = list(semantic_id_sizes or [])
        levels = len(self.semantic_id_sizes)
        if levels:
            codes = torch.full((rows, levels), -1, dtype=torch.int64) if item_codes is None else item_codes
            if tuple(codes.shape) != (rows, levels):
                raise ValueError(f"item_codes must be [{rows}, {levels}], got {list(codes.shape)}")
            self.register_buffer("item_codes", codes.to(torch.int64).clone())
        if text_dim:
            text = torch.zeros(rows, text_dim) if item_text is None else item_text
            if tuple(text.shape) != (rows, text_dim):
                raise ValueError(f"item_text must be [{rows}, {text_dim}], got {list(text.shape)}")
            self.register_buffer("item_text", text.float().clone())
            self.text_proj = nn.Linear(text_dim, dim, bias=False)
        attrs = [list(a) for a in item_attributes] + [[]] * (rows - len(item_attributes))
        words = [list(w) for w in item_words] + [[]] * (rows - len(item_words))
        if not use_attributes:
            attrs = [[] for _ in range(rows)]
        if not use_words:
            words = [[] for _ in range(rows)]
        for name, (off, val) in {"attr": _csr(attrs), "word": _csr(words)}.items():
            self.register_buffer(f"{name}_offsets", off, persistent=False)
            self.register_buffer(f"{name}_values", val, persistent=False)
        specs = [TableSpec("item_id", rows, dim, ("item_id",), "sum"),
                 TableSpec("attribute", max(num_attributes, 1), dim, ("item_attributes",), "mean"),
                 TableSpec("word", max(num_words, 2), dim, ("item_words", "query_words"), "mean")]
        specs += [TableSpec(f"sid_{level}", size, dim, (semantic_id_feature(level),), "sum")
                  for level, size in enumerate(self.semantic_id_sizes)]
        self.table_specs = specs  # kept when the trainer swaps `ebc` for a sharded collection
        self.ebc: nn.Module = EmbeddingTables(specs, impl=bag_impl)
        for table in self.ebc.embedding_bags.values():
            nn.init.normal_(table.weight, std=dim ** -0.5)

    def features(self, item_ids: torch.Tensor, query: torch.Tensor | None = None,
                 query_lengths: torch.Tensor | None = None, id_dropout_seed: int | None = None) -> JaggedFeatures:
        """The jagged batch of unique 1-D `item_ids` [U] and (optionally) query-word bags [B], from the
        tower's buffers alone. One batch carries both, so the shared word table is looked up once;
        it needs one stride for all keys, so the shorter side is padded with empty bags.
        `id_dropout_seed` (training): drop id vectors with the tower's `id_dropout` rate."""
        item_ids = clamp_item_ids(item_ids, self.num_items)
        dev = item_ids.device
        n_items = item_ids.numel()
        n_query = 0 if query is None else query.shape[0]
        stride = max(n_items, n_query, 1)
        pad_i, pad_q = stride - n_items, stride - n_query
        zeros = lambda n: torch.zeros(n, dtype=torch.int64, device=dev)  # noqa: E731
        attr_len, attr_val = gather_csr(self.attr_offsets, self.attr_values, item_ids)
        word_len, word_val = gather_csr(self.word_offsets, self.word_values, item_ids)
        id_len = (item_ids != 0).long()
        if id_dropout_seed is not None and self.id_dropout > 0:
            # DropoutNet-style: some items train on content alone, as a new item must be served
            id_len = id_len * id_dropout_keep(item_ids, self.id_dropout, id_dropout_seed).long()
        if query is None:
            q_len, q_val = zeros(0), zeros(0)
        else:
            q_len = query_lengths.clamp(0, query.shape[1])
            mask = torch.arange(query.shape[1], device=dev).unsqueeze(0) < q_len.unsqueeze(1)
            q_val = query[mask]
        sid_keys, sid_len, sid_val = [], [], []
        if self.semantic_id_sizes:
            codes = self.item_codes[item_ids]
            for level in range(len(self.semantic_id_sizes)):
                has = codes[:, level] >= 0
                sid_keys.append(semantic_id_feature(level))
                sid_len += [has.long(), zeros(pad_i)]
                sid_val.append(codes[has, level])
        lengths = torch.cat([id_len, zeros(pad_i), attr_len, zeros(pad_i), word_len, zeros(pad_i),
                             q_len, zeros(pad_q), *sid_len])
        values = torch.cat([item_ids[id_len.bool()], attr_val, word_val, q_val, *sid_val])
        return JaggedFeatures([*ITEM_FEATURES, "query_words", *sid_keys], values, lengths, stride)

    def pool(self, features, item_ids: torch.Tensor, n_query: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors of the `item_ids` [U] that `features` (JaggedFeatures, or its KJT for a sharded
        collection) was built from, and the pooled query bags [n_query] (None for 0)."""
        vec, _, query_vec = self._pool_parts(features, item_ids, n_query)
        return vec, query_vec

    def _pool_parts(self, features, item_ids: torch.Tensor,
                    n_query: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(item vectors [U], their id-row part [U] (zero where the id was dropped), query bags)."""
        if isinstance(features, JaggedFeatures) and not isinstance(self.ebc, EmbeddingTables):
            features = features.to_kjt()
        pooled = self.ebc(features)
        n_items = item_ids.numel()
        keys = [*ITEM_FEATURES, *(semantic_id_feature(level) for level in range(len(self.semantic_id_sizes)))]
        vec = sum(pooled[f][:n_items] for f in keys)
        if hasattr(self, "text_proj"):
            vec = vec + self.text_proj(self.item_text[clamp_item_ids(item_ids, self.num_items)])
        return vec, pooled["item_id"][:n_items], (pooled["query_words"][:n_query] if n_query else None)

    def content_and_full(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(content vectors, full vectors) [U, dim] of unique 1-D `item_ids` [U], from one lookup with
        every id row present: content = full - the id row, the vector the same item gets with no id
        row (as a new item: `content_vectors`); it carries no gradient to the id table."""
        features = self.features(item_ids)
        full, id_part, _ = self._pool_parts(features, item_ids, 0)
        return full - id_part, full

    def lookup(self, item_ids: torch.Tensor, query: torch.Tensor | None = None,
               query_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors for unique 1-D `item_ids` [U] and (optionally) pooled query-word bags [B]."""
        seed = None
        if self.training and self.id_dropout > 0:
            seed = int(torch.randint(1 << 62, (1,)))
        features = self.features(item_ids, query, query_lengths, id_dropout_seed=seed)
        vec, query_vec = self.pool(features, item_ids, 0 if query is None else query.shape[0])
        if query is not None and query_vec is None:  # an empty query batch
            query_vec = vec.new_zeros(0, self.dim)
        return vec, query_vec

    def forward(self, item_ids: torch.Tensor, query: torch.Tensor | None = None,
                query_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors for item ids of any shape (computed once per unique id) and pooled queries."""
        uniq, inverse = torch.unique(item_ids.reshape(-1), return_inverse=True)
        vec, query_vec = self.lookup(uniq, query, query_lengths)
        return vec[inverse].reshape(*item_ids.shape, self.dim), query_vec

    def content_vectors(self, attributes: list[list[int]], words: list[list[int]],
                        text: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
        """[M, dim] vectors of items that have no id row (new items): the content path alone, the
        way id dropout trains it. Per item: attribute ids, content-word ids, the frozen text-encoder
        vector `text` [M, text_dim] and semantic-ID codes `codes` [M, levels] (-1 = none)."""
        m, dev = len(attributes), self.attr_offsets.device
        if len(words) != m:
            raise ValueError(f"{m} attribute rows but {len(words)} word rows")
        if m == 0:
            return torch.zeros(0, self.dim, device=dev)
        attributes = attributes if self.use_attributes else [[] for _ in range(m)]
        words = words if self.use_words else [[] for _ in range(m)]
        zeros = torch.zeros(m, dtype=torch.int64, device=dev)
        bags = [torch.tensor([len(r) for r in rows], dtype=torch.int64, device=dev) for rows in (attributes, words)]
        values = [torch.tensor([v for r in rows for v in r], dtype=torch.int64, device=dev) for rows in (attributes, words)]
        keys, lengths = [*ITEM_FEATURES, "query_words"], [zeros, *bags, zeros]
        if self.semantic_id_sizes:
            codes = torch.full((m, len(self.semantic_id_sizes)), -1, dtype=torch.int64) if codes is None else codes
            codes = codes.to(dev)
            for level in range(len(self.semantic_id_sizes)):
                has = codes[:, level] >= 0
                keys.append(semantic_id_feature(level))
                lengths.append(has.long())
                values.append(codes[has, level])
        features = JaggedFeatures(keys, torch.cat(values), torch.cat(lengths), m)
        pooled = self.ebc(features)
        vec = sum(pooled[key][:m] for key in keys if key != "query_words")
        if hasattr(self, "text_proj"):
            if text is None or tuple(text.shape) != (m, self.text_proj.in_features):
                raise ValueError(f"this tower adds text vectors: text must be [{m}, {self.text_proj.in_features}]")
            vec = vec + self.text_proj(text.to(dev, torch.float32))
        return vec

    def id_table(self) -> nn.Parameter:
        """The item-id embedding weights (the table that only an item's own interactions train)."""
        return self.ebc.embedding_bags["item_id"].weight

    def all_items(self) -> torch.Tensor:
        """[num_items + 2, dim]: row = item id (row 0 zeros, last row OOV)."""
        return self.lookup(torch.arange(self.num_items + 2, device=self.attr_offsets.device))[0]


class PrecomputedItemTower(nn.Module):
    """Export/serving form: the tower's output for every item as one constant table, and the query
    word table as a plain nn.Embedding (masked mean = the collection's MEAN pooling)."""

    def __init__(self, tower: ItemTower):
        super().__init__()
        self.num_items, self.dim = tower.num_items, tower.dim
        with torch.no_grad():
            self.register_buffer("table", tower.all_items().detach().clone())
            word_weight = tower.ebc.embedding_bags["word"].weight.detach().clone()
        self.words = nn.Embedding.from_pretrained(word_weight, freeze=True, padding_idx=None)

    def forward(self, item_ids: torch.Tensor, query: torch.Tensor | None = None,
                query_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        vec = self.table[clamp_item_ids(item_ids, self.num_items)]
        return vec, (None if query is None else self._pool_query(query, query_lengths))

    def all_items(self) -> torch.Tensor:
        return self.table

    def _pool_query(self, query: torch.Tensor, query_lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(query.shape[1], device=query.device)
        mask = (positions.unsqueeze(0) < query_lengths.unsqueeze(1)).to(self.table.dtype)
        summed = (self.words(query.clamp(0, self.words.num_embeddings - 1)) * mask.unsqueeze(-1)).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp(min=1.0)
