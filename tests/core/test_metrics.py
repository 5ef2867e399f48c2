"""Ranking metrics against hand-computed cases: Recall@K, NDCG@K, MRR, tie handling, bootstrap CI."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unirank.evaluation.metrics import metrics_from_ranks, summarize, target_ranks

INF = float("inf")


def test_metrics_for_given_ranks():
    m = metrics_from_ranks(np.array([0, 1, 4, 9, 25]), ks=[5, 10])
    assert m["recall@5"].tolist() == [1, 1, 1, 0, 0]
    assert m["recall@10"].tolist() == [1, 1, 1, 1, 0]
    np.testing.assert_allclose(m["ndcg@5"], [1.0, 0.6309297535714575, 0.38685280723454163, 0, 0])
    np.testing.assert_allclose(m["ndcg@10"], [1.0, 0.6309297535714575, 0.38685280723454163, 0.28906482631788766, 0])
    np.testing.assert_allclose(m["mrr"], [1, 1 / 2, 1 / 5, 1 / 10, 1 / 26])
    assert set(m) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "mrr"}


def test_boundary_rank_k_is_a_miss_and_half_ranks_work():
    m = metrics_from_ranks(np.array([4.0, 5.0, 0.5]), ks=[5])
    assert m["recall@5"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(m["ndcg@5"], [1 / math.log2(6), 0, 1 / math.log2(2.5)])
    np.testing.assert_allclose(m["mrr"], [1 / 5, 1 / 6, 1 / 1.5])


def test_target_ranks_strictly_higher_items():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [4.0, 3.0, 2.0, 1.0]])
    assert target_ranks(scores, torch.tensor([2, 0])).tolist() == [2.0, 0.0]
    assert target_ranks(scores, torch.tensor([0, 3])).tolist() == [3.0, 3.0]


def test_target_ranks_ties_count_half_of_the_other_tied_items():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0],
                           [2.0, 1.0, 1.0, 0.0, 1.0]])
    # row 0: nothing higher, 3 other items tied -> 1.5; row 1: one higher, 2 others tied -> 2.0
    assert target_ranks(scores, torch.tensor([0, 1])).tolist() == [1.5, 2.0]
    # no tie-breaking in the target's favour: a constant scorer is not a perfect scorer
    const = torch.zeros(3, 11)
    assert target_ranks(const, torch.tensor([1, 5, 10])).tolist() == [5.0, 5.0, 5.0]


def test_filtered_target_is_a_miss_everywhere():
    """A target removed from the ranking (-inf) is a miss for every K and has zero reciprocal rank,
    also when few items are left unfiltered (here 2 of 6 ids keep a finite score)."""
    scores = torch.tensor([[-INF, 0.2, -INF, 0.1, -INF, -INF]])
    ranks = target_ranks(scores, torch.tensor([2])).numpy()
    m = metrics_from_ranks(ranks, ks=[5, 10, 20])
    for k in (5, 10, 20):
        assert m[f"recall@{k}"].tolist() == [0.0] and m[f"ndcg@{k}"].tolist() == [0.0]
    assert m["mrr"].tolist() == [0.0]


def test_summarize_mean_and_ci():
    rng = np.random.default_rng(0)
    values = (rng.random(400) < 0.3).astype(np.float64)
    out = summarize({"recall@10": values}, num_bootstrap=500, seed=1)
    mean, (lo, hi) = out["recall@10"]["mean"], out["recall@10"]["ci95"]
    assert mean == pytest.approx(values.mean())
    assert lo < mean < hi
    assert summarize({"recall@10": values}, num_bootstrap=500, seed=1) == out  # seeded
    no_boot = summarize({"recall@10": values}, num_bootstrap=0)
    assert no_boot["recall@10"]["ci95"] == [no_boot["recall@10"]["mean"]] * 2


def test_bootstrap_ci_shrinks_with_more_users():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 10_000):
        values = (rng.random(n) < 0.3).astype(np.float64)
        lo, hi = summarize({"m": values}, num_bootstrap=300)["m"]["ci95"]
        assert lo <= values.mean() <= hi
        widths.append(hi - lo)
    # the CI width scales like 1/sqrt(n): 100x users -> ~10x narrower
    assert widths[1] < widths[0] / 5
    assert 0.1 < widths[0] < 0.25  # 2 * 1.96 * sqrt(0.21 / 100) = 0.18
