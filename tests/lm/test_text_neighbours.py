"""Text neighbours in the similar-item / pre-query scores (model/text_neighbours.py): the table is
the exact top-k cosine, the anchor is the source or the newest history item the model reads,
the term is content only (an item without an id row gets it), its weights are learned through the
loss, and it survives ONNX export and new items."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unirank.config import ModelConfig
from unirank.model.catalogue import Catalogue
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import Task
from unirank.model.scoring import NeighbourTerm, position_anchors, term_scores
from unirank.model.text_neighbours import TextNeighbours, neighbour_table

NUM_ITEMS, TEXT_DIM, K = 30, 8, 5


def item_text(seed: int = 0) -> torch.Tensor:
    """[NUM_ITEMS + 2, TEXT_DIM]: rows 0 and the last are padding / OOV (zero); item 7 has no text."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(NUM_ITEMS + 2, TEXT_DIM, generator=g)
    text[0] = text[-1] = text[7] = 0.0
    return text


def make_ranker(seed: int = 0, max_history: int = 6) -> UnifiedRanker:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    attributes = [[]] + [rng.integers(0, 5, size=2).tolist() for _ in range(NUM_ITEMS)]
    words = [[]] + [rng.integers(2, 20, size=3).tolist() for _ in range(NUM_ITEMS)]
    cfg = RankerConfig(num_items=NUM_ITEMS, num_attributes=5, num_words=20, dim=16, num_heads=2,
                       max_history=max_history, max_query_len=4, text_features=True, text_dim=TEXT_DIM,
                       text_neighbours=K)
    return UnifiedRanker(cfg, Catalogue(attributes, words, item_text=item_text(seed))).eval()


def test_table_is_the_exact_top_k_cosine_without_itself_or_textless_items():
    text = item_text()
    ids, sims = neighbour_table(text, K, chunk=7)  # several chunks
    unit = torch.nn.functional.normalize(text[1: NUM_ITEMS + 1], dim=1)
    cos = unit @ unit.T
    for item in range(1, NUM_ITEMS + 1):
        if item == 7:
            assert (ids[item] == 0).all() and (sims[item] == 0).all()
            continue
        row = cos[item - 1].clone()
        row[item - 1] = -torch.inf
        row[6] = -torch.inf  # item 7: no text, nobody's neighbour
        top, index = row.topk(K)
        assert ids[item].tolist() == (index + 1).tolist()
        torch.testing.assert_close(sims[item], top)
    assert (ids[0] == 0).all() and (ids[-1] == 0).all() and not (ids == 7).any()


def test_full_and_candidate_scores_agree_and_only_similar_and_prequery_get_them():
    near = TextNeighbours(NUM_ITEMS, K, item_text())
    with torch.no_grad():
        near.weight.copy_(torch.tensor([2.0, 0.5]))
    anchor = torch.tensor([3, 3, 3, 0, NUM_ITEMS + 5])
    task = torch.tensor([int(Task.SIMILAR), int(Task.PREQUERY), int(Task.SEARCH), int(Task.SIMILAR), int(Task.SIMILAR)])
    full = near(anchor, task)
    assert full.shape == (5, NUM_ITEMS + 2)
    torch.testing.assert_close(full[0, near.ids[3]], 2.0 * near.sims[3])
    torch.testing.assert_close(full[1], full[0] / 4.0)
    assert (full[2:] == 0).all()  # search; no anchor; an unknown anchor
    candidates = torch.tensor([[0, *near.ids[3].tolist()[:2], 1, NUM_ITEMS + 1]] * 5)
    torch.testing.assert_close(near(anchor, task, candidates), full.gather(1, candidates))


def test_the_anchor_is_the_source_or_the_newest_history_item_the_model_reads():
    ranker = make_ranker(max_history=3)
    task = torch.tensor([int(Task.PREQUERY), int(Task.SIMILAR), int(Task.PREQUERY), int(Task.SEARCH)])
    history = torch.tensor([[4, 5, 6, 8, 9], [4, 5, 0, 0, 0], [0, 0, 0, 0, 0], [4, 5, 0, 0, 0]])
    lengths = torch.tensor([4, 2, 0, 2])
    source = torch.tensor([0, 11, 12, 13])
    query = torch.zeros(4, 2, dtype=torch.long)
    inputs = (task, history, lengths, query, torch.zeros(4, dtype=torch.long), source)
    with torch.no_grad():
        terms = term_scores(ranker.terms, ranker.view(*inputs))
        expected = ranker.terms["text_neighbours"](torch.tensor([8, 11, 0, 0]), task)
    torch.testing.assert_close(terms, expected)
    assert terms[0].abs().sum() > 0 and terms[1].abs().sum() > 0 and (terms[2:] == 0).all()
    anchors = position_anchors(ranker.view(*inputs))  # the newest 3 of 4: 5, 6, 8
    assert anchors[0].tolist() == [0, 5, 6, 8] and anchors[1].tolist() == [11, 0, 0, 0]
    # Content only: a cold target (zeroed id row) keeps the term.
    target = int(ranker.terms["text_neighbours"].ids[8, 0])
    with torch.no_grad():
        ranker.item_tower.id_table()[target].zero_()
        assert term_scores(ranker.terms, ranker.view(*inputs))[0, target] == terms[0, target] != 0


@pytest.mark.parametrize("negatives", [0, 8])
def test_the_task_weights_are_learned_through_the_loss(negatives):
    from unirank.data.examples import TrainingExamples
    from unirank.config import load_config
    from unirank.training.loss import item_frequencies, softmax_loss
    from unirank.data.prepare import build_ranker, prepare

    cfg = load_config(None, ["data.synthetic.num_users=150", "data.synthetic.num_items=60", "model.dim=16",
                             "model.max_history=8", "model.num_layers=1", "model.text_features=true",
                             "model.text_neighbours=10", "model.lexical=names"])
    prep = prepare(cfg)
    ranker = build_ranker(cfg, prep).train()
    batch = next(TrainingExamples(prep.split, prep.builder, 64, seed=0).epoch())
    freq = item_frequencies(prep.split.train, prep.data.num_items)
    weights = {Task.SEARCH: 1.0, Task.SIMILAR: 1.0, Task.PREQUERY: 1.0}
    loss, _ = softmax_loss(ranker, batch, negatives, freq, torch.Generator().manual_seed(0), weights)
    loss.backward()
    assert (ranker.terms["text_neighbours"].weight.grad.abs() > 0).all()
    assert float(ranker.terms["lexical"].scale.grad.abs()) > 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="text_features"):
        ModelConfig(text_neighbours=10)
    with pytest.raises(ValueError, match=">= 0"):
        ModelConfig(text_neighbours=-1, text_features=True)
    with pytest.raises(ValueError, match="text rows"):
        TextNeighbours(NUM_ITEMS, K, item_text()[:-1])


def test_onnx_export_and_a_rebuilt_table_with_new_items(tmp_path):
    from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
    from unirank.serving.metadata import ExportMetadata
    from unirank.serving.synthetic_requests import random_batches
    from unirank.model.tokenizer import WordTokenizer

    ranker = make_ranker()
    plain = ranker.to_plain()
    metadata = export_onnx(plain, tmp_path, top_k=8, tokenizer=WordTokenizer([f"w{i}" for i in range(18)]))
    batches = random_batches(ExportMetadata.load(tmp_path / "export.json"), vocab_size=20, requests=64, seed=0)
    session = onnx_session(tmp_path / "model.onnx")
    assert parity_max_abs_diff(TopKRanker(plain, 8).eval(), session, batches) <= 1e-4
    with torch.no_grad():
        off = ranker.to_plain()
        off.terms["text_neighbours"].weight.zero_()
    assert parity_max_abs_diff(TopKRanker(off, 8).eval(), session, batches) > 1e-3  # the graph has the term
    # A new item with item 3's text joins item 3's list (and has item 3 first in its own).
    text = item_text()
    extended = torch.cat([text[: NUM_ITEMS + 1], text[3:4], text[NUM_ITEMS + 1:]])
    plain.terms["text_neighbours"].rebuild(extended)
    assert plain.terms["text_neighbours"].num_items == NUM_ITEMS + 1 and plain.terms["text_neighbours"].ids.shape[0] == NUM_ITEMS + 3
    assert int(plain.terms["text_neighbours"].ids[3, 0]) == NUM_ITEMS + 1 and int(plain.terms["text_neighbours"].ids[NUM_ITEMS + 1, 0]) == 3
    assert metadata.num_items == NUM_ITEMS
