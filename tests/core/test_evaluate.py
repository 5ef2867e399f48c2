"""Evaluation path: full-catalogue scoring, the protocol's filtering and metrics through evaluate_task."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unirank.model.request import RankRequest, Task
from unirank.evaluation.evaluate import evaluate_task, filter_seen
from unirank.data.examples import RequestBuilder, fit_tokenizer, leave_one_out_split

from core_data import hand_data

NEG = -torch.inf
NUM_ITEMS = 6


def _request(source: list[int], task: Task = Task.SEARCH) -> RankRequest:
    b = len(source)
    z = torch.zeros(b, 1, dtype=torch.int64)
    return RankRequest(task=torch.full((b,), int(task), dtype=torch.int64), history=z, history_lengths=z[:, 0], query=z,
                       query_lengths=z[:, 0], source_item=torch.tensor(source))


def _neg_columns(scores: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isneginf(row)).view(-1).tolist() for row in scores]


@pytest.mark.parametrize("task", [Task.SEARCH, Task.PREQUERY])
def test_filter_seen_drops_history_for_personalized_tasks(task):
    scores = torch.ones(2, NUM_ITEMS + 2)
    out = filter_seen(scores, task, _request([5, 6], task), [np.array([1, 3, 3]), np.array([], dtype=np.int64)])
    assert _neg_columns(out) == [[0, 1, 3, 7], [0, 7]]  # padding 0 and OOV (last) are never ranked
    assert torch.all(scores == 1)  # the caller's scores are not modified


def test_filter_seen_drops_only_the_source_for_similar_item():
    scores = torch.ones(2, NUM_ITEMS + 2)
    out = filter_seen(scores, Task.SIMILAR, _request([2, 4], Task.SIMILAR), [np.array([1, 2]), np.array([3, 4])])
    assert _neg_columns(out) == [[0, 2, 7], [0, 4, 7]]


class FixedScorer:
    """score(item) = item id, except padding 0 and OOV which score highest (they must be filtered)."""

    name = "fixed"
    tasks = tuple(Task)

    def __init__(self):
        self.requests = []

    def scores(self, task, request):
        self.requests.append((task, request))
        row = torch.arange(NUM_ITEMS + 2, dtype=torch.float32)
        row[0], row[-1] = 100.0, 50.0
        return row.expand(request.batch_size, -1).clone()


SEQUENCES = [[1, 2, 3, 4], [6, 5, 1], [3, 1, 6]]


@pytest.fixture()
def setup():
    data = hand_data(SEQUENCES, [[]] + [[1]] * NUM_ITEMS, ["", "gadget"])
    split = leave_one_out_split(data.sequences)
    builder = RequestBuilder(data, fit_tokenizer(data), max_history=5, max_query_len=4)
    return split, builder


# Test targets 4, 1, 6 with histories [1,2,3], [6,5], [3,1] (score = item id):
#   personalized: u0 keeps {4,5,6} -> rank 2; u1 keeps {1,2,3,4} -> rank 3; u2 keeps {2,4,5,6} -> rank 0
#   similar-item (source = last history item): u0 drops 3 -> rank 2; u1 drops 5 -> {2,3,4,6} higher -> 4;
#   u2 drops 1 -> rank 0
EXPECTED_RANKS = {Task.PREQUERY: [2, 3, 0], Task.SEARCH: [2, 3, 0], Task.SIMILAR: [2, 4, 0]}


@pytest.mark.parametrize("task", list(Task))
def test_fixed_scorer_gives_hand_computed_metrics(task, setup):
    split, builder = setup
    scorer = FixedScorer()
    result = evaluate_task(scorer, task, split.test, builder, ks=(1, 3, 5), batch_size=2, num_bootstrap=0)
    ranks = EXPECTED_RANKS[task]
    assert result["num_users"] == 3
    for k in (1, 3, 5):
        assert result[f"recall@{k}"]["mean"] == pytest.approx(sum(r < k for r in ranks) / 3)
        assert result[f"ndcg@{k}"]["mean"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks if r < k) / 3)
    assert result["mrr"]["mean"] == pytest.approx(sum(1 / (r + 1) for r in ranks) / 3)
    # every request carried the evaluated task; batches of 2 cover the 3 users
    assert [int(req.batch_size) for _, req in scorer.requests] == [2, 1]
    assert all(t == task and torch.all(req.task == int(task)) for t, req in scorer.requests)


def test_hand_numbers_for_prequery(setup):
    split, builder = setup
    result = evaluate_task(FixedScorer(), Task.PREQUERY, split.test, builder, ks=(1, 3), num_bootstrap=0)
    assert result["recall@1"]["mean"] == pytest.approx(1 / 3)
    assert result["recall@3"]["mean"] == pytest.approx(2 / 3)
    assert result["ndcg@3"]["mean"] == pytest.approx((0.5 + 1.0) / 3)
    assert result["mrr"]["mean"] == pytest.approx((1 / 3 + 1 / 4 + 1) / 3)


def test_validation_split_and_user_subset(setup):
    split, builder = setup
    # validation targets 3, 5, 1 with histories [1,2], [6], [3]: ranks 3 ({3,4,5,6}), 0 ({1..5}), 4 ({1,2,4,5,6})
    result = evaluate_task(FixedScorer(), Task.PREQUERY, split.valid, builder, ks=(1,), num_bootstrap=0)
    assert result["recall@1"]["mean"] == pytest.approx(1 / 3)
    assert result["mrr"]["mean"] == pytest.approx((1 / 4 + 1 + 1 / 5) / 3)
    sub = evaluate_task(FixedScorer(), Task.PREQUERY, split.valid, builder, ks=(1,), num_bootstrap=0, max_users=2)
    assert sub["num_users"] == 2


def test_constant_scorer_gets_the_expected_rank_not_the_best(setup):
    split, builder = setup

    class Constant(FixedScorer):
        def scores(self, task, request):
            return torch.zeros(request.batch_size, NUM_ITEMS + 2)

    result = evaluate_task(Constant(), Task.PREQUERY, split.test, builder, ks=(1,), num_bootstrap=0)
    # unfiltered items per user: 3, 4, 4 -> expected ranks 1, 1.5, 1.5
    assert result["recall@1"]["mean"] == 0.0
    assert result["mrr"]["mean"] == pytest.approx((1 / 2 + 1 / 2.5 + 1 / 2.5) / 3)


def test_repeated_target_in_history_is_a_miss():
    """The protocol filters every history item, so a repeat-consumption target cannot be hit."""
    data = hand_data([[2, 1, 2, 2]], [[]] + [[1]] * NUM_ITEMS, ["", "gadget"])
    split = leave_one_out_split(data.sequences)
    builder = RequestBuilder(data, fit_tokenizer(data), max_history=5, max_query_len=4)
    result = evaluate_task(FixedScorer(), Task.PREQUERY, split.test, builder, ks=(5, 10), num_bootstrap=0)
    assert result["recall@10"]["mean"] == 0.0 and result["mrr"]["mean"] == 0.0
