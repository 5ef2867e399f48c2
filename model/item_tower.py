"""Item tower: item-id embedding + pooled attribute bag + pooled content-word bag (+ semantic-ID
codes + projected text-encoder vector, the LM features), summed.

All sparse lookups go through ONE TorchRec EmbeddingBagCollection so the planner can shard them:
one table per semantic-ID level (`sid_<l>`, feature `item_sid_<l>`) sits beside the id,
attribute and word tables. The word table is shared between item content words and search-query
words (feature `query_words`), so a query word and the same word on an item start from the same
vector. The frozen text-encoder vectors of the items are a dense buffer (not trained) followed by
a trained projection: content reaches items whose ids never appeared in training.
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

ITEM_FEATURES = ("item_id", "item_attributes", "item_words")


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
    pos = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return lengths, values[torch.repeat_interleave(starts, lengths) + pos]


class ItemTower(nn.Module):
    """Maps item ids (any shape) to vectors. Id 0 is padding (zero vector); ids outside
    [1, num_items] use the reserved OOV row num_items + 1.

    `id_dropout`: in training, each item's id vector is dropped with this probability (per call),
    so the content features learn to stand in for ids (cold start).

    LM features (optional): `semantic_id_sizes` [rows per level] turns on one table per level,
    indexed by `item_codes` [num_items + 2, levels] (-1 = no code: padding / OOV rows);
    `text_dim` > 0 adds `text_proj(item_text[id])`, `item_text` [num_items + 2, text_dim] frozen.
    Both are persistent buffers, so a checkpoint carries them and a loaded model needs no encoder.
    """

    def __init__(self, num_items: int, item_attributes: list[list[int]], num_attributes: int,
                 item_words: list[list[int]], num_words: int, dim: int,
                 use_attributes: bool = True, use_words: bool = True, bag_impl: str = "torchrec",
                 semantic_id_sizes: list[int] | None = None, item_codes: torch.Tensor | None = None,
                 text_dim: int = 0, item_text: torch.Tensor | None = None, id_dropout: float = 0.0):
        super().__init__()
        self.num_items, self.dim, self.bag_impl = num_items, dim, bag_impl
        self.id_dropout = id_dropout
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
        tables = [
            EmbeddingBagConfig(name="item_id", embedding_dim=dim, num_embeddings=rows,
                               feature_names=["item_id"], pooling=PoolingType.SUM),
            EmbeddingBagConfig(name="attribute", embedding_dim=dim, num_embeddings=max(num_attributes, 1),
                               feature_names=["item_attributes"], pooling=PoolingType.MEAN),
            EmbeddingBagConfig(name="word", embedding_dim=dim, num_embeddings=max(num_words, 2),
                               feature_names=["item_words", "query_words"], pooling=PoolingType.MEAN),
        ] + [EmbeddingBagConfig(name=f"sid_{level}", embedding_dim=dim, num_embeddings=size,
                                feature_names=[semantic_id_feature(level)], pooling=PoolingType.SUM)
             for level, size in enumerate(self.semantic_id_sizes)]
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        for table in self.ebc.embedding_bags.values():
            nn.init.normal_(table.weight, std=dim ** -0.5)

    def lookup(self, item_ids: torch.Tensor, query: torch.Tensor | None = None,
               query_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors for unique 1-D `item_ids` [U] and (optionally) pooled query-word bags [B].

        Both go through one KJT so the shared word table is looked up once; KJT needs one stride
        for all keys, so the shorter side is padded with empty bags.
        """
        item_ids = clamp_item_ids(item_ids, self.num_items)
        n_items = item_ids.numel()
        n_query = 0 if query is None else query.shape[0]
        stride = max(n_items, n_query, 1)
        pad_i, pad_q = stride - n_items, stride - n_query
        zeros = lambda n: torch.zeros(n, dtype=torch.int64)  # noqa: E731
        attr_len, attr_val = gather_csr(self.attr_offsets, self.attr_values, item_ids)
        word_len, word_val = gather_csr(self.word_offsets, self.word_values, item_ids)
        id_len = (item_ids != 0).long()
        if self.training and self.id_dropout > 0:
            # DropoutNet-style: some items train on content alone, as a new item must be served
            id_len = id_len * (torch.rand(n_items) >= self.id_dropout).long()
        if query is None:
            q_len, q_val = zeros(0), zeros(0)
        else:
            q_len = query_lengths.clamp(0, query.shape[1])
            mask = torch.arange(query.shape[1]).unsqueeze(0) < q_len.unsqueeze(1)
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
        item_keys = [*ITEM_FEATURES, *sid_keys]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[*ITEM_FEATURES, "query_words", *sid_keys],
                                                  values=values, lengths=lengths)
        pooled = self.ebc(kjt) if self.bag_impl == "torchrec" else self._kernel_bags(kjt)
        vec = sum(pooled[f][:n_items] for f in item_keys)
        if hasattr(self, "text_proj"):
            vec = vec + self.text_proj(self.item_text[item_ids])
        return vec, (pooled["query_words"][:n_query] if query is not None else None)

    def _kernel_bags(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """The EBC's lookup through kernels/embedding_bag (one launch for all features) on the
        EBC's own weights: same parameters, same pooling (MEAN == SUM for the one-id item bag)."""
        from unirank.kernels.embedding_bag import multi_embedding_bag

        table_of = {f: name for name, cfg in zip(self.ebc.embedding_bags, self.ebc.embedding_bag_configs())
                    for f in cfg.feature_names}
        feats = kjt.to_dict()
        keys = list(feats)
        pooled = multi_embedding_bag(
            [self.ebc.embedding_bags[table_of[k]].weight for k in keys], [feats[k].values() for k in keys],
            [feats[k].offsets() for k in keys], mode="mean", impl="triton")
        return dict(zip(keys, pooled))

    def forward(self, item_ids: torch.Tensor, query: torch.Tensor | None = None,
                query_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors for item ids of any shape (computed once per unique id) and pooled queries."""
        uniq, inverse = torch.unique(item_ids.reshape(-1), return_inverse=True)
        vec, query_vec = self.lookup(uniq, query, query_lengths)
        return vec[inverse].reshape(*item_ids.shape, self.dim), query_vec

    def id_table(self) -> nn.Parameter:
        """The item-id embedding weights (the table that only an item's own interactions train)."""
        return self.ebc.embedding_bags["item_id"].weight

    def all_items(self) -> torch.Tensor:
        """[num_items + 2, dim]: row = item id (row 0 zeros, last row OOV)."""
        return self.lookup(torch.arange(self.num_items + 2))[0]


class PrecomputedItemTower(nn.Module):
    """Export/serving form: the tower's output for every item as one constant table, and the query
    word table as a plain nn.Embedding (masked mean = the EBC's MEAN pooling)."""

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
        mask = (torch.arange(query.shape[1]).unsqueeze(0) < query_lengths.unsqueeze(1)).to(self.table.dtype)
        summed = (self.words(query.clamp(0, self.words.num_embeddings - 1)) * mask.unsqueeze(-1)).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp(min=1.0)

