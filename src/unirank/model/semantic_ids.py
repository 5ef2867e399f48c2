"""Semantic IDs: residual K-means (RQ-KMeans) codes of item content embeddings, as in TIGER.

Level l clusters (FAISS k-means) what levels 0..l-1 left unexplained, so items with similar text share code
prefixes. A final collision level numbers items that share the whole code tuple 0, 1, 2, ... in
item order, making every item's semantic ID unique. `SemanticIdTable` turns the codes into
embedding ids (one id per level, offset so all levels can share one table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# The collision code of an item without a number of its own (a new item at export, a held-out item in
# cold-start evaluation): 0, the code of every code tuple's first item, a row every code tuple trains.
UNSEEN_COLLISION_CODE = 0


def default_codebook_size(num_items: int) -> int:
    """~sqrt(N) codes per level (capped at 256): enough prefixes to separate items, few empty codes."""
    return int(min(256, max(2, round(math.sqrt(num_items)))))


@dataclass
class SemanticIdConfig:
    num_levels: int = 3
    codebook_size: int | None = None  # None: default_codebook_size(num_items)
    seed: int = 0
    max_iters: int = 100

    def __post_init__(self):
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.codebook_size is not None and self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1, keepdims=True) - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)
    return np.maximum(d, 0.0)


def kmeans(x: np.ndarray, k: int, seed: int, max_iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means (seeded, every point in the fit, at most `max_iters` Lloyd iterations; FAISS
    re-seeds an empty code by splitting a large one). Returns (centroids [k, D] float64, assignment
    [N]): each point's nearest centroid in float64, the rule `ResidualKMeans.quantize` applies."""
    try:
        import faiss  # the `index` extra: only semantic IDs need it, a model without them imports no FAISS
    except ImportError as err:
        raise ImportError("semantic IDs need FAISS k-means: pip install 'unirank[index]' (faiss-cpu)") from err
    x = np.asarray(x, dtype=np.float64)
    k = min(k, len(x))
    clustering = faiss.Kmeans(x.shape[1], k, niter=max_iters, seed=seed, verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=max(1, len(x)))
    clustering.train(np.ascontiguousarray(x, dtype=np.float32))
    centroids = clustering.centroids.astype(np.float64)
    return centroids, _squared_distances(x, centroids).argmin(1)


def resolve_collisions(codes: np.ndarray) -> np.ndarray:
    """Rank of each item among items with the same code tuple, in item order (0 if unique)."""
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(group)) - run_start
    return rank


@dataclass
class ResidualKMeans:
    """Fitted RQ-KMeans codebooks; `quantize` also assigns items that were not in the fit."""

    codebooks: list[np.ndarray]  # per level [codebook_size, D]
    residual_mse: list[float] = field(default_factory=list)  # mean ||x - x_hat_l||^2 after each level
    input_mse: float = 0.0  # mean ||x||^2, the error with zero levels

    @classmethod
    def fit(cls, embeddings: np.ndarray, config: SemanticIdConfig) -> "ResidualKMeans":
        residual = np.asarray(embeddings, dtype=np.float64).copy()
        size = config.codebook_size or default_codebook_size(len(residual))
        fitted = cls(codebooks=[], input_mse=float((residual ** 2).sum(1).mean()))
        for level in range(config.num_levels):
            centroids, assign = kmeans(residual, size, seed=config.seed + level,
                                       max_iters=config.max_iters)
            residual -= centroids[assign]
            fitted.codebooks.append(centroids)
            fitted.residual_mse.append(float((residual ** 2).sum(1).mean()))
        return fitted

    def quantize(self, embeddings: np.ndarray) -> np.ndarray:
        """Greedy nearest codeword per level: int64 [N, num_levels]."""
        residual = np.asarray(embeddings, dtype=np.float64).copy()
        codes = np.empty((len(residual), len(self.codebooks)), dtype=np.int64)
        for level, centroids in enumerate(self.codebooks):
            codes[:, level] = _squared_distances(residual, centroids).argmin(1)
            residual -= centroids[codes[:, level]]
        return codes

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        return sum(centroids[codes[:, level]] for level, centroids in enumerate(self.codebooks))


def semantic_ids(embeddings: np.ndarray, config: SemanticIdConfig | None = None,
                 fit_rows: np.ndarray | None = None) -> tuple[np.ndarray, ResidualKMeans]:
    """int64 [N, num_levels + 1] codes (last column: collision index) and the fitted quantiser.
    `fit_rows` restricts the codebook fit to those rows (the others are only assigned codes)."""
    fit = embeddings if fit_rows is None else np.asarray(embeddings)[np.asarray(fit_rows, dtype=np.int64)]
    quantizer = ResidualKMeans.fit(fit, config or SemanticIdConfig())
    codes = quantizer.quantize(embeddings)
    return np.concatenate([codes, resolve_collisions(codes)[:, None]], axis=1), quantizer


def semantic_id_stats(codes: np.ndarray, quantizer: ResidualKMeans) -> dict:
    """Numbers the benchmark prints: error per level, codebook use, and how often tuples collide."""
    prefix = codes[:, :-1]
    _, group_sizes = np.unique(prefix, axis=0, return_counts=True)
    return {
        "num_items": int(len(codes)),
        "codebook_sizes": [len(c) for c in quantizer.codebooks],
        "codes_used_per_level": [int(len(np.unique(prefix[:, l]))) for l in range(prefix.shape[1])],
        "input_mse": quantizer.input_mse,
        "residual_mse_per_level": quantizer.residual_mse,
        "relative_residual_per_level": [m / quantizer.input_mse for m in quantizer.residual_mse],
        "unique_code_tuples": int(len(group_sizes)),
        # share of items whose code tuple is shared with another item (they need the extra level)
        "collision_rate": float(group_sizes[group_sizes > 1].sum() / len(codes)),
        "max_items_per_tuple": int(group_sizes.max()),
    }


class SemanticIdTable:
    """Semantic-ID codes -> embedding ids: level l's code c becomes `offsets[l] + c`.

    `level_sizes[l]` rows per level (the collision level is sized by the deepest collision), so
    the global ids index one table of `num_embeddings` rows; the raw per-level codes index one
    table per level of `level_sizes[l]` rows. Rows of `codes` are items in the caller's order.
    """

    def __init__(self, codes: np.ndarray | torch.Tensor, level_sizes: list[int] | None = None):
        codes = torch.as_tensor(np.asarray(codes), dtype=torch.int64)
        if codes.dim() != 2 or (codes < 0).any():
            raise ValueError("codes must be a non-negative [num_items, num_levels] array")
        observed = (codes.max(0).values + 1).tolist()
        self.level_sizes = list(level_sizes) if level_sizes is not None else observed
        if len(self.level_sizes) != codes.shape[1] or any(
                o > s for o, s in zip(observed, self.level_sizes)):
            raise ValueError(f"level_sizes {self.level_sizes} do not cover the codes (need {observed})")
        self.codes = codes
        self.offsets = torch.tensor([0] + self.level_sizes[:-1], dtype=torch.int64).cumsum(0)

    @classmethod
    def from_quantizer(cls, codes: np.ndarray, quantizer: ResidualKMeans) -> "SemanticIdTable":
        """Size the K-means levels by their codebooks (not by the codes that happen to be used)."""
        collision_size = int(codes[:, -1].max()) + 1
        return cls(codes, [len(c) for c in quantizer.codebooks] + [collision_size])

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def num_embeddings(self) -> int:
        return int(sum(self.level_sizes))

    def level_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Raw codes of items `rows` (any shape): [..., num_levels], for one table per level."""
        return self.codes[rows]

    def global_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Offset codes of items `rows`: [..., num_levels], all levels in one table."""
        return self.codes[rows] + self.offsets
