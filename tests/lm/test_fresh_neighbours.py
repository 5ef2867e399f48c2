"""The fresh items' candidate union (model.fresh_neighbours = M): the boost goes only to the M fresh
items nearest the row's anchor by text, never to a warm item, never on search rows; the candidate
path equals the full path; the exported graph answers as the eager model (candidates, exclusions and
top_k included); items added at export join the union; the union is not a two-stage term
(`unirank export --index` refuses it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unirank.config import ModelConfig
from unirank.model.catalogue import Catalogue
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import Task
from unirank.model.scoring import AddedItems, RequestView

NUM_ITEMS, TEXT_DIM, M, BOOST = 30, 8, 3, 2.5
FRESH = [2, 5, 9, 11, 17, 23, 29]  # items without a training interaction


def item_text(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(NUM_ITEMS + 2, TEXT_DIM, generator=g)
    text[0] = text[-1] = 0.0
    return text


def counts() -> torch.Tensor:
    c = torch.full((NUM_ITEMS + 2,), 4, dtype=torch.int64)
    c[0] = c[-1] = 0
    c[FRESH] = 0
    return c


def make_ranker(neighbours: int = M) -> UnifiedRanker:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    attributes = [[]] + [rng.integers(0, 5, size=2).tolist() for _ in range(NUM_ITEMS)]
    words = [[]] + [rng.integers(2, 20, size=3).tolist() for _ in range(NUM_ITEMS)]
    cfg = RankerConfig(num_items=NUM_ITEMS, num_attributes=5, num_words=20, dim=16, num_heads=2, max_history=6,
                       max_query_len=4, text_features=True, text_dim=TEXT_DIM)
    ranker = UnifiedRanker(cfg, Catalogue(attributes, words, item_text=item_text(), item_counts=counts())).eval()
    ranker.set_inference_settings(counts(), fresh_boost=BOOST, fresh_neighbours=neighbours)
    return ranker


def nearest_fresh(anchor: int, text: torch.Tensor, fresh: list[int], m: int = M) -> list[int]:
    unit = torch.nn.functional.normalize(text, dim=1)
    others = [f for f in fresh if f != anchor]
    cos = torch.stack([unit[anchor] @ unit[f] for f in others])
    return sorted(others[int(i)] for i in cos.topk(min(m, len(others))).indices)


def view(task, history, lengths, source) -> RequestView:
    b = len(task)
    return RequestView(torch.tensor(task), torch.tensor(history), torch.tensor(lengths),
                       torch.zeros(b, 2, dtype=torch.int64), torch.zeros(b, dtype=torch.int64), torch.tensor(source))


def test_only_the_anchors_text_nearest_fresh_items_gain_the_boost():
    term = make_ranker().terms["fresh"]
    assert not term.two_stage and term.needs_text and term.inference_only
    v = view([int(Task.SIMILAR), int(Task.PREQUERY), int(Task.SEARCH), int(Task.PREQUERY), int(Task.SIMILAR)],
             [[0, 0, 0], [4, 6, 0], [4, 6, 0], [0, 0, 0], [0, 0, 0]], [0, 2, 2, 0, 0], [3, 0, 0, 0, 9])
    full = term.scores(v)
    assert full.shape == (5, NUM_ITEMS + 2)
    text = item_text()
    for row, anchor in ((0, 3), (1, 6), (4, 9)):  # similar source; newest history item; a fresh anchor
        expected = torch.zeros(NUM_ITEMS + 2)
        expected[nearest_fresh(anchor, text, FRESH)] = BOOST
        torch.testing.assert_close(full[row], expected)
    assert (full[2] == 0).all() and (full[3] == 0).all()  # search; pre-query with no history
    candidates = torch.tensor([[0, 2, 5, 9, 11, 17, 23, 29, 3, NUM_ITEMS + 1, NUM_ITEMS + 7]] * 5)
    inside = candidates.clamp(max=NUM_ITEMS + 1)
    expected = full.gather(1, inside) * (candidates <= NUM_ITEMS + 1)
    torch.testing.assert_close(term.scores(v, candidates), expected)


def test_every_fresh_item_without_the_union_and_none_when_the_boost_is_off():
    every = make_ranker(neighbours=0).terms["fresh"]
    assert every.two_stage
    v = view([int(Task.SEARCH)], [[0, 0, 0]], [0], [0])
    assert sorted(torch.nonzero(every.scores(v)[0]).squeeze(1).tolist()) == FRESH
    ranker = make_ranker()
    ranker.set_inference_settings(counts(), fresh_boost=0.0, fresh_neighbours=M)
    assert "fresh" not in ranker.terms


def test_the_graph_answers_as_the_model_and_new_items_join_the_union(tmp_path):
    from unirank.model.tokenizer import WordTokenizer
    from unirank.serving.metadata import ExportMetadata
    from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
    from unirank.serving.synthetic_requests import random_batches

    ranker = make_ranker()
    plain = ranker.to_plain()
    export_onnx(plain, tmp_path, top_k=8, tokenizer=WordTokenizer([f"w{i}" for i in range(18)]))
    batches = random_batches(ExportMetadata.load(tmp_path / "export.json"), vocab_size=20, requests=96, seed=0)
    session = onnx_session(tmp_path / "model.onnx")
    assert parity_max_abs_diff(TopKRanker(plain, 8).eval(), session, batches) <= 1e-4
    without = make_ranker()
    without.set_inference_settings(counts(), fresh_boost=0.0)
    assert parity_max_abs_diff(TopKRanker(without.to_plain(), 8).eval(), session, batches) > 1e-3  # the graph has it

    # A new item with item 3's text: fresh (no interactions), the nearest fresh item to item 3.
    text = item_text()
    added = AddedItems(["new"], [["a"]], None, text=text[3:4], catalogue_text=text)
    term = plain.terms["fresh"]
    term.extend(added)
    new = NUM_ITEMS + 1
    assert term.nearest.shape == (NUM_ITEMS + 3, M) and int(term.nearest[3, 0]) == new
    assert int(term.counts[new]) == 0 and float(term.bonus[new]) == BOOST and float(term.bonus[-1]) == 0.0
    v = view([int(Task.SIMILAR)], [[0, 0, 0]], [0], [3])
    assert float(term.scores(v)[0, new]) == BOOST


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="text_features"):
        ModelConfig(fresh_neighbours=5)
    with pytest.raises(ValueError, match=">= 0"):
        ModelConfig(fresh_neighbours=-1, text_features=True)
