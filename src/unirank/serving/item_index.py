"""Item index for two-stage serving: the context graph gives each request's context vector, a FAISS
index over the item tower's vectors gives the nearest items, and the request's rules are applied here.

numpy + faiss only: the file is copied next to the python-backend model.py (like request_arrays.py).

Kinds (`IndexOptions.kind`):
  flat   exact inner product over every item: the in-graph answer, for small catalogues and tests;
  hnsw   HNSW graph over the full vectors (IndexHNSWFlat): fast, ~ (4 d + 8 m) bytes per item;
  ivfpq  inverted lists of product-quantized codes (IndexIVFPQ): pq_m bytes per item (+ 8 for the
         id); its scores are PQ estimates, unless `refine` > 0: then refine * k PQ hits are re-scored
         exactly from the full vectors (IndexRefineFlat, + 4 d bytes per item).
Scores match the model's: dot, or cosine (vectors and queries L2-normalized), divided by temperature.
Rules, as in the exact graph: search / pre-query rows never return a history item (known or not),
similar-item rows never the source item, no row an id of its exclude list; a row with candidates ranks exactly its candidates (each
once), scored exactly; unfilled slots are (0, -inf).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

INDEX_FILE = "item_index.faiss"
INDEX_META_FILE = "item_index.json"
ADDED_FILE = "item_index_added.npy"  # exact vectors of items added after export (candidate scoring)
ITEM_TABLE_FILE = "item_table.npy"  # the exported item table [num_items + 2, d], the context graph's input
TABLE_INPUT = "item_table"
KINDS = ("flat", "hnsw", "ivfpq")
INDEX_FILES = (INDEX_FILE, INDEX_META_FILE, ADDED_FILE, ITEM_TABLE_FILE)
SIMILAR = 1


@dataclass
class IndexOptions:
    """How the index is built and searched. Recall@100 of each search setting is measured per
    catalogue size by benchmarks/catalogue_scale.py (docs/SERVING.md, "Catalogue scale", gives the
    recommended settings: nprobe and ef_search grow with the catalogue)."""

    kind: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 0  # 0: 4 * sqrt(num_items), at least 1
    nprobe: int = 32
    pq_m: int = 0  # 0: dim // 2 sub-quantizers of 8 bits
    train_size: int = 200_000  # vectors used to train the IVF-PQ quantizers
    refine: int = 0  # ivfpq: re-score refine * k PQ hits exactly (0 = PQ scores only)
    threads: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        if min(self.hnsw_m, self.ef_construction, self.ef_search, self.nprobe, self.threads) < 1:
            raise ValueError("hnsw_m, ef_construction, ef_search, nprobe and threads must be >= 1")


def _faiss():
    try:
        import faiss
    except ImportError as err:  # the `index` extra
        raise ImportError("the item index needs FAISS: pip install 'unirank[index]' (faiss-cpu; faiss-gpu on GPU machines)") from err
    return faiss


def _prepare(vectors: np.ndarray, similarity: str) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if similarity == "cosine":  # as F.normalize: v / max(|v|, 1e-12)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def _with_bias(vectors: np.ndarray, bias: np.ndarray | float, temperature: float) -> np.ndarray:
    """Item vectors with the per-item score as one more column (times the temperature, so that the
    index's inner product over the temperature adds it as it is)."""
    column = np.broadcast_to(np.asarray(bias, np.float32) * temperature, (len(vectors),))
    return np.ascontiguousarray(np.column_stack([vectors, column]), dtype=np.float32)


class ItemIndex:
    """Item ids -> vectors, searched by inner product; `search` returns the model's scores."""

    def __init__(self, index, meta: dict, added: np.ndarray | None = None, item_table: np.ndarray | None = None):
        self.index, self.meta, self.item_table = index, meta, item_table  # item_table: memory-mapped, read-only
        self.added = np.zeros((0, meta["dim"] + 1), np.float32) if added is None else added  # [id, vector...]
        self.configure(meta["options"].get("ef_search"), meta["options"].get("nprobe"), meta["options"].get("refine"))

    @classmethod
    def build(cls, vectors: np.ndarray, similarity: str = "dot", temperature: float = 1.0,
              options: IndexOptions | None = None, ids: np.ndarray | None = None,
              bias: np.ndarray | None = None) -> "ItemIndex":
        """`vectors` [N, d] of item ids `ids` (default 1..N): the item tower's exported table.
        `bias` [N]: a per-item score added to the similarity (a score term that depends on the item
        alone, e.g. the fresh items' boost), stored as one more column (times the temperature)
        that every query meets with a 1, so the index ranks by the model's whole score. Dot only:
        cosine would normalize the column away."""
        faiss = _faiss()
        options = options or IndexOptions()
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
        if bias is not None and similarity != "dot":
            raise ValueError("a per-item score (bias) in the index needs similarity 'dot'")
        faiss.omp_set_num_threads(options.threads)
        data = _prepare(vectors, similarity)
        if bias is not None:
            data = _with_bias(data, bias, temperature)
        n, dim = data.shape
        ids = np.arange(1, n + 1, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if options.kind == "flat":
            inner = faiss.IndexFlatIP(dim)
        elif options.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = options.ef_construction
        else:
            nlist = options.nlist or max(1, int(4 * np.sqrt(n)))
            pq_m = options.pq_m or max(1, dim // 2)
            if n < 256:
                raise ValueError(f"ivfpq needs >= 256 items to train its 8-bit codebooks, got {n}: use kind='flat'")
            if dim % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the vector width {dim}")
            inner = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(0).choice(n, size=min(n, options.train_size), replace=False)
            inner.train(data[np.sort(sample)])
            if options.refine:
                inner = faiss.IndexRefineFlat(inner)
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(data, ids)
        meta = {"kind": options.kind, "similarity": similarity, "temperature": float(temperature), "dim": dim,
                "num_items": int(ids.max(initial=0)), "options": asdict(options), "bias": bias is not None}
        return cls(index, meta)

    def configure(self, ef_search: int | None = None, nprobe: int | None = None, refine: int | None = None) -> None:
        """Search-time knobs (HNSW efSearch, IVF nprobe, refine factor); ignored by the other kinds."""
        faiss = _faiss()
        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexRefine):
            if refine:
                inner.k_factor = float(refine)
            inner = faiss.downcast_index(inner.base_index)
        if ef_search and isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = int(ef_search)
        if nprobe and isinstance(inner, faiss.IndexIVF):
            inner.nprobe = int(nprobe)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        """Context vectors as the index reads them (a 1 against the bias column)."""
        queries = _prepare(queries, self.meta["similarity"])
        if self.meta.get("bias"):
            queries = np.ascontiguousarray(np.column_stack([queries, np.ones(len(queries), np.float32)]))
        return queries

    def add(self, ids: np.ndarray, vectors: np.ndarray, bias: np.ndarray | float = 0.0) -> None:
        """New items (e.g. content-path vectors of items the model never saw), no rebuild. Ids must
        be new: above the exported catalogue and not added before. `bias`: their per-item score
        (an index built with one)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        width = self.meta["dim"] - int(bool(self.meta.get("bias")))  # the item vectors' width, without the bias column
        if vectors.shape[1] != width:
            raise ValueError(f"vectors are {vectors.shape[1]}-d, the index is {width}-d")
        if self.meta.get("bias"):
            vectors = _with_bias(vectors, bias, self.meta["temperature"])
        taken = set(self.added[:, 0].astype(np.int64).tolist())
        if (ids <= self.meta["num_items"]).any() or taken & set(ids.tolist()) or len(set(ids.tolist())) < len(ids):
            raise ValueError(f"added item ids must be new and > {self.meta['num_items']} (the exported catalogue)")
        self.index.add_with_ids(_prepare(vectors, self.meta["similarity"]), ids)
        self.added = np.concatenate([self.added, np.column_stack([ids.astype(np.float32), vectors])])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids [B, k] int64, model scores [B, k] float32); unfilled slots are (0, -inf)."""
        k = max(1, min(int(k), len(self)))
        scores, ids = self.index.search(self._queries(queries), k)
        missing = ids < 0
        scores = (scores / self.meta["temperature"]).astype(np.float32)
        scores[missing] = -np.inf
        return np.where(missing, 0, ids), scores

    def added_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        """Exact model scores [B, C] of added item ids (NaN where an id was not added); None if none."""
        if not len(self.added):
            return None
        order = np.argsort(self.added[:, 0])
        added_ids = self.added[order, 0].astype(np.int64)
        where = np.clip(np.searchsorted(added_ids, ids), 0, len(added_ids) - 1)
        found = added_ids[where] == ids
        vectors = _prepare(self.added[order, 1:], self.meta["similarity"])[where]  # [B, C, d]
        scores = np.einsum("bd,bcd->bc", self._queries(queries), vectors) / self.meta["temperature"]
        return np.where(found, scores, np.nan).astype(np.float32)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(directory / INDEX_FILE))
        (directory / INDEX_META_FILE).write_text(json.dumps(self.meta, indent=2))
        if len(self.added):
            np.save(directory / ADDED_FILE, self.added)
        if self.item_table is not None and not (directory / ITEM_TABLE_FILE).exists():
            np.save(directory / ITEM_TABLE_FILE, self.item_table)

    @classmethod
    def load(cls, directory: str | Path, threads: int | None = None) -> "ItemIndex":
        """`threads`: FAISS search threads (default: the build's)."""
        directory = Path(directory)
        meta = json.loads((directory / INDEX_META_FILE).read_text())
        added = np.load(directory / ADDED_FILE) if (directory / ADDED_FILE).exists() else None
        table = np.load(directory / ITEM_TABLE_FILE, mmap_mode="r") if (directory / ITEM_TABLE_FILE).exists() else None
        _faiss().omp_set_num_threads(int(threads or meta["options"]["threads"]))
        return cls(_faiss().read_index(str(directory / INDEX_FILE)), meta, added, table)


def hidden_ids(request: dict[str, np.ndarray]) -> list[set[int]]:
    """Per row, the ids that must not be shown, by the rule of the exact graph (model/scoring.py
    hidden_ids, in numpy here: this file runs without torch): the valid history (search, pre-query)
    or the source item (similar-item), and the valid exclude ids."""
    hidden = []
    exclude, exclude_lengths = request.get("exclude"), request.get("exclude_lengths")
    for row, task in enumerate(request["task"].tolist()):
        if task == SIMILAR:
            hidden.append({int(request["source_item"][row])})
        else:
            hidden.append(set(request["history"][row, : int(request["history_lengths"][row])].tolist()))
        if exclude is not None:
            hidden[-1].update(exclude[row, : int(exclude_lengths[row])].tolist())
        hidden[-1].discard(0)
    return hidden


def _top_k_of(ids: np.ndarray, scores: np.ndarray, hidden: set[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of one row's ids: padding, hidden ids and repeats (an id is ranked once) dropped."""
    seen = set(hidden) | {0}
    keep = np.array([i not in seen and not seen.add(i) for i in ids.tolist()], dtype=bool)
    ids, scores = ids[keep], np.where(np.isnan(scores[keep]), -np.inf, scores[keep])
    order = np.argsort(-scores, kind="stable")[:k]
    out_ids, out_scores = np.zeros(k, np.int64), np.full(k, -np.inf, np.float32)
    out_ids[: len(order)], out_scores[: len(order)] = ids[order], scores[order]
    out_ids[out_scores == -np.inf] = 0
    return out_ids, out_scores


def two_stage_topk(index: ItemIndex, context: np.ndarray, candidate_scores: np.ndarray,
                   request: dict[str, np.ndarray], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The served answer (item_ids [B, top_k], scores [B, top_k]) from the context graph's outputs.

    Rows without candidates ask the index for top_k + |hidden| items (enough to survive the
    exclusions); rows with candidates use the graph's exact candidate scores (the added items' exact
    scores for ids the index gained after export)."""
    candidates = request["candidates"]
    hidden = hidden_ids(request)
    added = index.added_scores(context, candidates)
    if added is not None:
        candidate_scores = np.where(np.isnan(added), candidate_scores, added)
    use_catalogue = ~(candidates != 0).any(axis=1)
    fetched = {}
    if use_catalogue.any():
        rows = np.nonzero(use_catalogue)[0]
        ids, scores = index.search(context[rows], top_k + max(len(hidden[r]) for r in rows))
        fetched = {r: (ids[j], scores[j]) for j, r in enumerate(rows.tolist())}
    out_ids = np.zeros((len(candidates), top_k), np.int64)
    out_scores = np.full((len(candidates), top_k), -np.inf, np.float32)
    for row in range(len(candidates)):
        ids, scores = fetched.get(row, (candidates[row], candidate_scores[row]))
        out_ids[row], out_scores[row] = _top_k_of(ids, scores, hidden[row], top_k)
    return out_ids, out_scores


CONTEXT_MODEL_FILE = "context.onnx"  # the graph variant: request in, (context, candidate_scores) out
CONTEXT_OUTPUTS = ("context", "candidate_scores")


class TwoStageRanker:
    """A padded request batch -> (item_ids, scores), like the exact graph: the context graph (an ONNX
    Runtime session) then the index. Loaded from a directory holding context.onnx and the index."""

    def __init__(self, session, index: ItemIndex, top_k: int):
        self.session, self.index, self.top_k = session, index, int(top_k)
        self.table_input = TABLE_INPUT in {i.name for i in session.get_inputs()}
        if self.table_input and index.item_table is None:
            raise FileNotFoundError(f"the context graph reads {TABLE_INPUT!r}: {ITEM_TABLE_FILE} must be beside the index")

    def context(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The context graph's (context [B, d], candidate_scores [B, C])."""
        feed = dict(batch, **{TABLE_INPUT: self.index.item_table}) if self.table_input else batch
        return tuple(self.session.run(list(CONTEXT_OUTPUTS), feed))

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        context, candidate_scores = self.context(batch)
        return two_stage_topk(self.index, context, candidate_scores, batch, self.top_k)
