"""The suggest task's data: the query catalogue (deterministic, training positions only), its
evaluation (targets, coverage, nothing filtered) and its baselines."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from core_data import hand_data
from unirank.data.examples import RequestBuilder, build_search_query, leave_one_out_split
from unirank.model.tokenizer import WordTokenizer
from unirank.data.query_catalogue import build_query_catalogue, suggest_cases, typed_prefixes
from unirank.evaluation.baselines import LastItemQueries, QueryPopularity
from unirank.evaluation.evaluate import evaluate_task
from unirank.model.request import QueryTask, Task

NAMES = ["Red Lipstick", "Nail Polish", "Hair Care", "Brand Acme", "Only In Test", "Only In Validation", "Shampoo"]
# item 5 carries a name no training item has and is only ever a test target; item 6 only a validation target
ATTRIBUTES = [[], [0, 3], [1, 3], [2], [2, 6], [4], [5], [0, 1]]
SEQUENCES = [[1, 2, 3, 6, 5], [2, 3, 4, 6, 5], [3, 1, 7, 2, 6, 5], [4, 4, 1, 6, 5], [7, 1, 2, 3]]


def data(sequences=SEQUENCES):
    return hand_data(sequences, ATTRIBUTES, NAMES)


def test_catalogue_holds_every_training_query_once_with_its_count_most_frequent_first():
    d = data()
    split = leave_one_out_split(d.sequences)
    catalogue = build_query_catalogue(d, split, modulus=0)
    expected = Counter(build_search_query(d, int(u), int(i)) for u, s in zip(split.users, split.train) for i in s)
    assert {t: int(catalogue.counts[catalogue.id_of(t)]) for t in catalogue.texts} == dict(expected)
    assert catalogue.texts == sorted(expected, key=lambda t: (-expected[t], t))
    assert catalogue.counts[0] == catalogue.counts[-1] == 0 and len(catalogue.counts) == len(catalogue) + 2
    again = build_query_catalogue(data(), leave_one_out_split(data().sequences), modulus=0)
    assert again.texts == catalogue.texts and np.array_equal(again.counts, catalogue.counts)


def test_validation_and_test_targets_never_reach_the_catalogue():
    d = data()
    catalogue = build_query_catalogue(d, leave_one_out_split(d.sequences), modulus=0)
    words = {w for t in catalogue.texts for w in t.split()}
    assert not words & {"only", "test", "validation"}
    # Other validation / test targets: the same catalogue, counts included.
    other = [s[:-2] + [7, 3] for s in SEQUENCES]
    changed = build_query_catalogue(data(other), leave_one_out_split(data(other).sequences), modulus=0)
    assert changed.texts == catalogue.texts and np.array_equal(changed.counts, catalogue.counts)


def test_held_out_names_never_appear_in_catalogue_queries():
    d = data()
    modulus = 2  # holds out some of NAMES (crc32 rule)
    held = {n.lower() for n in NAMES if __import__("zlib").crc32(n.encode()) % modulus == 0}
    catalogue = build_query_catalogue(d, leave_one_out_split(d.sequences), modulus)
    assert held and len(catalogue)
    assert not any(h in t for t in catalogue.texts for h in held)


class OracleScorer:
    """Scores the true next query highest on each row (read from the builder), everything else 0."""

    name, tasks = "oracle", (QueryTask.SUGGEST,)

    def __init__(self, builder, cases):
        self.builder, self.cases, self.rows = builder, cases, 0

    def scores(self, task, request):
        b = request.batch_size
        users, targets = self.cases.users[self.rows: self.rows + b], self.cases.targets[self.rows: self.rows + b]
        self.rows += b
        out = torch.zeros(b, len(self.builder.queries) + 2)
        out[torch.arange(b), torch.from_numpy(self.builder.suggest_targets(users, targets))] = 1.0
        return out


def _builder(d):
    split = leave_one_out_split(d.sequences)
    catalogue = build_query_catalogue(d, split, modulus=0)
    tokenizer = WordTokenizer.fit(NAMES)
    return split, RequestBuilder(d, tokenizer, max_history=5, max_query_len=4, queries=catalogue)


def test_suggest_evaluation_ranks_the_next_searchs_query_and_counts_queries_outside_the_catalogue_as_misses():
    d = data()
    split, builder = _builder(d)
    for cases in (split.valid, split.test):
        kept = suggest_cases(d, cases, 0)
        targets = builder.suggest_targets(kept.users, kept.targets)
        result = evaluate_task(OracleScorer(builder, kept), QueryTask.SUGGEST, cases, builder, ks=(1,),
                               batch_size=2, num_bootstrap=0)
        coverage = float((targets > 0).mean())
        assert result["num_users"] == len(kept) and result["query_coverage"] == coverage
        assert result["recall@1"]["mean"] == coverage  # the oracle hits exactly the covered users
    # Test targets are item 5 ("only in test") for four users: their next query is not in the catalogue.
    assert evaluate_task(OracleScorer(builder, suggest_cases(d, split.test, 0)), QueryTask.SUGGEST, split.test,
                         builder, ks=(1,), num_bootstrap=0)["query_coverage"] == 0.2


def test_suggest_baselines_popularity_and_the_last_items_attribute_queries():
    d = data()
    split, builder = _builder(d)
    request = builder.build(QueryTask.SUGGEST, np.array([0, 1]), [np.array([3, 1]), np.array([], dtype=np.int64)],
                            np.zeros(2, dtype=np.int64))
    popular = QueryPopularity(builder.queries).scores(QueryTask.SUGGEST, request)
    assert popular[0, 1] == popular.max() and torch.equal(popular[0], popular[1])  # id 1 is the most frequent
    scores = LastItemQueries(d, builder.queries).scores(QueryTask.SUGGEST, request)
    best = builder.queries.texts[int(scores[0, 1:-1].argmax())]
    assert set(best.split()) <= {"red", "lipstick", "brand", "acme"}  # item 1's names
    inside = [t for t in builder.queries.texts if set(t.split()) <= {"red", "lipstick", "brand", "acme"}]
    top = [builder.queries.texts[int(i)] for i in scores[0, 1:-1].argsort(descending=True)[: len(inside)]]
    assert sorted(top) == sorted(inside)
    # no history: the popular order
    assert scores[1, 1:-1].argsort(descending=True).tolist() == popular[1, 1:-1].argsort(descending=True).tolist()


def test_typed_prefix_ranks_only_the_completions_and_popularity_becomes_prefix_completion():
    d = data()
    split, builder = _builder(d)
    catalogue = builder.queries
    assert catalogue.completions("").tolist() == list(range(1, len(catalogue) + 1))
    for prefix in {t[:2] for t in catalogue.texts}:
        ids = catalogue.completions(prefix)
        assert len(ids) and all(catalogue.texts[i - 1].startswith(prefix) for i in ids)
        assert sum(t.startswith(prefix) for t in catalogue.texts) == len(ids)
    mask = catalogue.prefix_mask(["re", "zz"])
    assert mask.shape == (2, len(catalogue) + 2) and not mask[1].any() and not mask[:, 0].any()
    with pytest.raises(ValueError, match=">= 0"):
        typed_prefixes(d, split.test, 0, -1)
    with pytest.raises(ValueError, match="suggest only"):
        evaluate_task(QueryPopularity(catalogue), Task.SEARCH, split.test, builder, prefix_chars=1)

    kept = suggest_cases(d, split.valid, 0)
    prefixes = typed_prefixes(d, kept, 0, 3)
    targets = builder.suggest_targets(kept.users, kept.targets)
    expected_ranks = []  # prefix completion by popularity, by hand: the target's rank among its completions
    for prefix, target in zip(prefixes, targets):
        if target == 0:
            continue
        completions = sorted(catalogue.completions(prefix), key=lambda i: (-catalogue.counts[i], i))
        expected_ranks.append(completions.index(target) + 1)
    result = evaluate_task(QueryPopularity(catalogue), QueryTask.SUGGEST, split.valid, builder, ks=(1,),
                           num_bootstrap=0, prefix_chars=3)
    covered = len(expected_ranks) / len(kept)
    assert result["mrr"]["mean"] == pytest.approx(sum(1 / r for r in expected_ranks) / len(kept))
    assert result["query_coverage"] == covered
    # the whole query typed: every covered target is its own only completion unless another query extends it
    whole = evaluate_task(OracleScorer(builder, kept), QueryTask.SUGGEST, split.valid, builder, ks=(1,),
                          num_bootstrap=0, prefix_chars=100)
    assert whole["recall@1"]["mean"] == covered
