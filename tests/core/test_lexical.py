"""The lexical match in the search score (model/lexical.py): BM25 as the bm25s library computes it,
the same numbers on every path (sparse, gather, candidates, ONNX), search rows only, content only
(an item without an id row still gets it), learned through the loss, and new items weighed with the
training catalogue's statistics."""
from __future__ import annotations

import bm25s
import numpy as np
import pytest
import torch

from unirank.model.lexical import LexicalMatch, table_width, term_weights
from unirank.config import ModelConfig
from unirank.model.catalogue import Catalogue
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import Task

NUM_ITEMS, VOCAB = 40, 30


def item_rows(seed: int = 0) -> list[list[int]]:
    """Token ids per id 0..NUM_ITEMS + 1 (repeats = term frequency); ids 0, 1 are padding / OOV."""
    rng = np.random.default_rng(seed)
    return [[]] + [rng.integers(2, VOCAB, size=int(rng.integers(1, 7))).tolist() for _ in range(NUM_ITEMS)] + [[]]


def make_ranker(seed: int = 0, lexical: str = "names") -> UnifiedRanker:
    torch.manual_seed(seed)
    rows = item_rows(seed)
    rng = np.random.default_rng(seed)
    attributes = [[]] + [rng.integers(0, 5, size=2).tolist() for _ in range(NUM_ITEMS)]
    words = [[]] + [rng.integers(2, VOCAB, size=3).tolist() for _ in range(NUM_ITEMS)]
    cfg = RankerConfig(num_items=NUM_ITEMS, num_attributes=5, num_words=VOCAB, dim=16, num_heads=2, max_history=8,
                       max_query_len=5, lexical=lexical, lexical_width=table_width(rows) if lexical != "none" else 0)
    return UnifiedRanker(cfg, Catalogue(attributes, words, lexical_rows=rows if lexical != "none" else None)).eval()


def lexical_scores(ranker, task, query, lengths):
    """The lexical term alone over the id space, for search rows of `task`."""
    empty = torch.zeros(len(task), 1, dtype=torch.long)
    view = ranker.view(task, empty, empty[:, 0], query, lengths, empty[:, 0])
    return ranker.terms["lexical"].scores(view)

def test_scores_are_bm25s_lucene_scores():
    rows = item_rows()
    lex = LexicalMatch(NUM_ITEMS, VOCAB, table_width(rows), rows)
    index = bm25s.BM25()  # Lucene BM25, k1 = 1.5, b = 0.75
    index.index([[str(t) for t in r] for r in rows[1: NUM_ITEMS + 1]], show_progress=False)
    query = torch.tensor([[3, 7, 11, 0], [5, 5, 2, 9]])
    lengths = torch.tensor([3, 4])
    ours = lex(query, lengths)[:, 1: NUM_ITEMS + 1].detach()
    for b, words in enumerate([["3", "7", "11"], ["5", "2", "9"]]):  # a query term counts once
        np.testing.assert_allclose(ours[b].numpy(), index.get_scores(words), rtol=1e-5, atol=1e-5)
    assert float(ours.abs().sum()) > 0


def test_every_path_gives_the_same_scores_and_padding_never_matches():
    rows = item_rows(1)
    lex = LexicalMatch(NUM_ITEMS, VOCAB, table_width(rows), rows)
    with torch.no_grad():
        lex.scale.fill_(0.7)
    query = torch.tensor([[4, 9, 1, 0, 300], [2, 3, 4, 5, 6]])  # OOV (1), padding (0), out of range (300)
    lengths = torch.tensor([5, 2])
    sparse = lex(query, lengths)
    lex.export_form()
    dense = lex(query, lengths)
    candidates = torch.tensor([[0, 3, 17, NUM_ITEMS, NUM_ITEMS + 1, 5], [1, 2, 3, 4, 5, 6]])
    picked = lex(query, lengths, candidates)
    torch.testing.assert_close(sparse, dense)
    known = (candidates >= 1) & (candidates <= NUM_ITEMS)
    torch.testing.assert_close(picked, torch.where(known, sparse.gather(1, candidates.clamp(max=NUM_ITEMS + 1)),
                                                   torch.zeros_like(picked)))
    # Only token 4 and 9 of row 0 count; positions past the length (row 1: 4, 5, 6) never do.
    only = lex(torch.tensor([[4, 9], [2, 3]]), torch.tensor([2, 2]))
    torch.testing.assert_close(dense, only)
    assert (sparse[:, 0] == 0).all() and (sparse[:, -1] == 0).all()
    # New items appended to the export form score as in the sparse form.
    eager = LexicalMatch(NUM_ITEMS, VOCAB, table_width(rows), rows)
    with torch.no_grad():
        eager.scale.fill_(0.7)
    new = [[4, 4, 9], [2, 3, 5, 6, 7, 8, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]
    lex.extend(new)
    eager.extend(new)
    torch.testing.assert_close(lex(query, lengths), eager(query, lengths))
    assert lex.chunk_items.max() == NUM_ITEMS + len(new) and float(lex(query, lengths)[:, NUM_ITEMS + 1].abs().sum()) > 0


def test_the_inverted_index_reads_every_chunk_of_a_common_token_and_a_repeated_term_once():
    from unirank.model.lexical import CHUNK

    rng = np.random.default_rng(3)
    n = 3 * CHUNK + 5  # token 7 in every item: four chunks of postings
    rows = [[]] + [[7, *rng.integers(2, 40, size=3).tolist()] for _ in range(n)] + [[]]
    eager = LexicalMatch(n, 40, table_width(rows), rows)
    lex = LexicalMatch(n, 40, table_width(rows), rows)
    lex.export_form()
    assert int(lex.chunk_count[7]) == 4 and lex.max_chunks == 4
    query = torch.tensor([[7, 7, 12, 0], [39, 38, 7, 12], [0, 0, 0, 0]])
    lengths = torch.tensor([3, 4, 0])
    torch.testing.assert_close(lex(query, lengths), eager(query, lengths))
    torch.testing.assert_close(lex(query[:1, 1:3], torch.tensor([2])), eager(query[:1], lengths[:1]))  # 7 once


def test_search_rows_only_and_an_item_without_id_row_is_scored_by_its_text():
    ranker = make_ranker()
    b = 3
    task = torch.tensor([int(Task.SEARCH), int(Task.PREQUERY), int(Task.SIMILAR)])
    query = torch.tensor([[5, 6, 0, 0, 0]] * b)
    lengths = torch.tensor([2, 2, 2])
    history = torch.tensor([[1, 2, 0]] * b)
    with torch.no_grad():
        ctx = ranker(task, history, torch.tensor([2, 2, 0]), query, lengths, torch.tensor([0, 0, 4]))
        plain = ranker.score(ctx)
        full = ranker.score(ctx, inputs=(task, history, torch.tensor([2, 2, 0]), query, lengths, torch.tensor([0, 0, 4])))
        lexical = lexical_scores(ranker, task, query, lengths)
    torch.testing.assert_close(full[1:], plain[1:])  # pre-query and similar-item: no lexical term
    torch.testing.assert_close(full[0], plain[0] + lexical[0])
    matching = [i for i, r in enumerate(item_rows()) if 5 in r or 6 in r]
    assert matching and (lexical[0, matching] > 0).all()
    # An item whose id row is zeroed (cold) keeps its lexical score: it depends on its text only.
    item = matching[0]
    with torch.no_grad():
        ranker.item_tower.id_table()[item].zero_()
        cold = lexical_scores(ranker, task, query, lengths)
    assert torch.isfinite(cold).all() and cold[0, item] == lexical[0, item] > 0
    other_text = torch.tensor([[7, 8, 0, 0, 0]] * b)
    assert lexical_scores(ranker, task, other_text, lengths)[0, item] != cold[0, item] or \
        not set(item_rows()[item]) & {7, 8}


def test_the_scale_is_learned_through_the_search_loss():
    from unirank.config import load_config
    from unirank.training.loss import item_frequencies, softmax_loss
    from unirank.data.prepare import build_ranker, prepare
    from unirank.data.examples import TrainingExamples

    cfg = load_config(None, ["data.synthetic.num_users=200", "data.synthetic.num_items=80", "model.dim=16",
                             "model.max_history=8", "model.num_layers=1", "model.lexical=names"])
    prep = prepare(cfg)
    ranker = build_ranker(cfg, prep).train()
    assert prep.lexical_rows is not None and len(prep.lexical_rows) == prep.data.num_items + 2
    batch = next(TrainingExamples(prep.split, prep.builder, 64, seed=0, tasks=[Task.SEARCH]).epoch())
    freq = item_frequencies(prep.split.train, prep.data.num_items)
    for negatives in (0, 16):
        ranker.zero_grad()
        loss, _ = softmax_loss(ranker, batch, negatives, freq, torch.Generator().manual_seed(0), {Task.SEARCH: 1.0})
        loss.backward()
        assert ranker.terms["lexical"].scale.grad is not None and float(ranker.terms["lexical"].scale.grad.abs()) > 0


def test_new_rows_use_the_training_statistics():
    rows = item_rows(2)
    lex = LexicalMatch(NUM_ITEMS, VOCAB, table_width(rows), rows)
    new = [[3, 3, 4], list(range(2, 2 + table_width(rows) + 3))]  # the second is wider than the table
    before = lex(torch.tensor([[3, 4]]), torch.tensor([2]))
    lex.extend(new)
    after = lex(torch.tensor([[3, 4]]), torch.tensor([2]))
    assert lex.num_items == NUM_ITEMS + 2 and after.shape[1] == NUM_ITEMS + 4
    torch.testing.assert_close(after[:, : NUM_ITEMS + 1], before[:, : NUM_ITEMS + 1])  # old items unchanged
    assert after[0, -1] == 0  # the OOV row moved to the end, still empty
    tokens, weights = term_weights(new, lex.idf, float(lex.avgdl), lex.tokens.shape[1])
    expected = (weights * ((tokens == 3) | (tokens == 4))).sum(1)
    torch.testing.assert_close(after[0, NUM_ITEMS + 1: NUM_ITEMS + 3], expected)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="model.lexical"):
        ModelConfig(lexical="title")
    rows = item_rows()
    with pytest.raises(ValueError, match="distinct lexical tokens"):
        LexicalMatch(NUM_ITEMS, VOCAB, 1, rows)
    with pytest.raises(ValueError, match="expected"):
        LexicalMatch(NUM_ITEMS, VOCAB, 8, rows[:-1])


def test_onnx_export_keeps_the_lexical_term(tmp_path):
    from unirank.model.tokenizer import WordTokenizer
    from unirank.serving.onnx_graph import TopKRanker, onnx_session, parity_max_abs_diff
    from unirank.serving.export import export_model
    from unirank.serving.metadata import MODEL_FILE
    from unirank.serving.synthetic_requests import random_batches
    from unirank.training.checkpoint import save_checkpoint

    ranker = make_ranker()
    tokenizer = WordTokenizer([f"w{i}" for i in range(VOCAB - 2)])
    path = tmp_path / "ckpt.pt"
    rng = np.random.default_rng(0)
    catalogue = Catalogue([[]] + [rng.integers(0, 5, 2).tolist() for _ in range(NUM_ITEMS)],
                          [[]] + [rng.integers(2, VOCAB, 3).tolist() for _ in range(NUM_ITEMS)],
                          tokenizer=tokenizer.to_dict(), lexical_rows=item_rows(0))
    save_checkpoint(path, ranker, catalogue, config_yaml="", metadata={})
    report = export_model(path, tmp_path / "export", top_k=10, parity_requests=64)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    # The graph does add it: the same graph without it (scale 0) answers search differently.
    off = ranker.to_plain()
    with torch.no_grad():
        off.terms["lexical"].scale.zero_()
    batches = random_batches(report.metadata, vocab_size=VOCAB, requests=64, seed=1)
    session = onnx_session(tmp_path / "export" / MODEL_FILE)
    assert parity_max_abs_diff(TopKRanker(off, 10).eval(), session, [{k: v for k, v in b.items()} for b in batches]) > 1e-3
    # The graph scores the search rows alone: batches without one (pre-query only) and with only one
    # (search, the rest pre-query) answer as PyTorch does, with and without candidates.
    on = TopKRanker(ranker.to_plain(), 10).eval()
    for searches in (0, 1):
        for b in batches[:2]:
            task = np.full_like(b["task"], int(Task.PREQUERY))
            task[:searches] = int(Task.SEARCH)
            assert parity_max_abs_diff(on, session, [{**b, "task": task}]) <= 1e-4
    from unirank.serving.item_index import IndexOptions

    with pytest.raises(ValueError, match="lexical"):
        export_model(path, tmp_path / "two-stage", top_k=10, parity_requests=0, index=IndexOptions())
