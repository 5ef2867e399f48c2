"""Ranking metrics for one held-out target per user: Recall@K (= HR@K), NDCG@K, MRR, with
bootstrap confidence intervals over users."""
from __future__ import annotations

import numpy as np
import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target: items scored strictly higher, plus half of the other
    items tied with it (the expected rank under random tie-breaking). Popularity and BM25 produce
    large tie groups; counting ties in the target's favour would flatter them."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    higher = (scores > target_scores).sum(1)
    tied_others = (scores == target_scores).sum(1) - 1
    ranks = higher.double() + tied_others.double() / 2
    # A filtered target (-inf) ties with the other filtered items, which could land it inside the
    # top K of a small catalogue; it was removed from the ranking, so it is a miss: rank +inf.
    return torch.where(torch.isneginf(target_scores.view(-1)), torch.inf, ranks)


def metrics_from_ranks(ranks: np.ndarray, ks: list[int]) -> dict[str, np.ndarray]:
    """Per-user metric values. A filtered-out target (score -inf) has rank >= catalogue size and so
    counts as a miss everywhere."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    out["mrr"] = 1.0 / (ranks + 1.0)
    return out


def summarize(per_user: dict[str, np.ndarray], num_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Mean and percentile-bootstrap 95% CI of each metric (users resampled with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(per_user.values())))
    idx = rng.integers(0, n, size=(num_bootstrap, n)) if num_bootstrap and n else None
    out = {}
    for name, values in per_user.items():
        mean = float(values.mean()) if n else float("nan")
        if idx is None:
            lo = hi = mean
        else:
            boot = values[idx].mean(axis=1)
            lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
        out[name] = {"mean": mean, "ci95": [lo, hi]}
    return out
