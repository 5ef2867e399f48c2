"""Two-stage answer (context graph + item index) against the exact in-graph top-k: a flat index
gives the same answer, exclusions and candidates included; added items are retrievable; the context
graph holds no item table and refuses the requests the exact graph refuses."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import NUM_ITEMS, TOP_K, make_ranker, torch_topk
from test_serving_contract import generated_cases
from unirank.serving.context_export import export_two_stage, item_vectors, load_two_stage
from unirank.serving.onnx_graph import TopKRanker
from unirank.serving.metadata import ExportMetadata, OUTPUT_NAMES
from unirank.serving.item_index import CONTEXT_MODEL_FILE, ITEM_TABLE_FILE, TABLE_INPUT, IndexOptions, ItemIndex
from unirank.serving.request_arrays import pad_and_stack
from unirank.serving.synthetic_requests import random_batches

pytest.importorskip("faiss")


def metadata() -> ExportMetadata:
    return ExportMetadata(NUM_ITEMS, 12, 6, TOP_K, [], [], 0)


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory, ranker):
    out = tmp_path_factory.mktemp("two_stage_flat")
    export_two_stage(ranker.to_plain(), out, IndexOptions("flat"))
    return out


def assert_same_answer(got, expected):
    (ids, scores), (want_ids, want_scores) = got, expected
    assert np.array_equal(ids == 0, want_ids == 0), "filled slots differ"
    np.testing.assert_array_equal(ids, want_ids)
    filled = want_ids != 0
    np.testing.assert_allclose(scores[filled], want_scores[filled], atol=1e-5)
    assert np.isneginf(scores[~filled]).all()


def test_flat_two_stage_equals_the_exact_graph(flat_dir, plain_topk):
    answer = load_two_stage(flat_dir, TOP_K)
    for batch in random_batches(metadata(), vocab_size=60, requests=96, seed=3):
        assert_same_answer(answer(batch), torch_topk(plain_topk, batch))


def _row(task, history=(), source=0, candidates=(), query=(5,), exclude=()):
    history, candidates, query = list(history), list(candidates), list(query) if task == 0 else []
    return {"task": np.array([task]), "history": np.array([history or [0]]), "history_lengths": np.array([len(history)]),
            "query": np.array([query or [0]]), "query_lengths": np.array([len(query)]),
            "source_item": np.array([source]), "candidates": np.array([candidates or [0]]),
            "exclude": np.array([list(exclude) or [0]]), "exclude_lengths": np.array([len(exclude)])}


def test_exclusions_and_candidates_follow_the_graph_rules(flat_dir, plain_topk):
    answer = load_two_stage(flat_dir, TOP_K)
    exact = torch_topk(plain_topk, pad_and_stack([_row(2)]))[0][0]
    rows = [_row(2, history=exact[:12]),  # every history item is a top item: over-fetch must cover them
            _row(0, history=[7, 9], candidates=[7, 8, 9, 10, 0, 11, 8, NUM_ITEMS + 3, 9]),
            _row(1, history=[3], source=int(exact[0]), candidates=[int(exact[0]), 4, 5]),
            _row(1, source=int(exact[1])),
            _row(2, history=exact[:2], exclude=[*exact[2:8].tolist(), NUM_ITEMS + 9]),  # exclude: never shown either
            _row(1, source=int(exact[1]), candidates=[int(exact[2]), 4, 5], exclude=[int(exact[2]), 5])]
    batch = pad_and_stack([{k: v.astype(np.int64) for k, v in r.items()} for r in rows])
    ids, scores = answer(batch)
    assert_same_answer((ids, scores), torch_topk(plain_topk, batch))
    assert not set(exact[:12].tolist()) & set(ids[0].tolist()) and (ids[0] != 0).all()
    assert sorted(ids[1][ids[1] != 0].tolist()) == [8, 10, 11, NUM_ITEMS + 3]  # 8 once; unknown id kept
    assert sorted(ids[2][ids[2] != 0].tolist()) == [4, 5]
    assert not set(exact[:8].tolist()) & set(ids[4].tolist()) and (ids[4] != 0).all()
    assert ids[5][ids[5] != 0].tolist() == [4]


def test_cosine_model_flat_index_equals_the_exact_graph(tmp_path):
    ranker = make_ranker(seed=1, similarity="cosine", temperature=0.1)
    plain = ranker.to_plain()
    export_two_stage(plain, tmp_path, IndexOptions("flat"))
    answer, reference = load_two_stage(tmp_path, TOP_K), TopKRanker(plain, TOP_K).eval()
    for batch in random_batches(metadata(), vocab_size=60, requests=48, seed=4):
        assert_same_answer(answer(batch), torch_topk(reference, batch))


@pytest.mark.parametrize("kind,refine", [("hnsw", 0), ("ivfpq", 0), ("ivfpq", 4)])
def test_approximate_kinds_recall_the_exact_top_items(kind, refine, ranker, tmp_path):
    vectors = item_vectors(ranker.to_plain())
    queries = np.random.default_rng(0).normal(size=(64, vectors.shape[1])).astype(np.float32)
    exact_ids, exact_scores = ItemIndex.build(vectors).search(queries, 10)
    ItemIndex.build(vectors, options=IndexOptions(kind, nprobe=16, refine=refine)).save(tmp_path)
    ids, scores = ItemIndex.load(tmp_path).search(queries, 10)
    if refine:  # re-scored exactly: the scores of the returned items are the model's
        np.testing.assert_allclose(scores[ids == exact_ids], exact_scores[ids == exact_ids], rtol=1e-5)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact_ids.tolist())])
    assert recall >= 0.8, recall
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_added_item_is_retrievable_scored_exactly_and_survives_a_reload(flat_dir, tmp_path):
    answer = load_two_stage(flat_dir, TOP_K)
    batch = pad_and_stack([{k: v.astype(np.int64) for k, v in _row(2, history=[1, 2]).items()}])
    context = answer.context(batch)[0]
    new_id, vector = NUM_ITEMS + 5, 10 * context[0]  # far along the user's context: ranks first
    answer.index.add([new_id], vector[None])
    assert answer(batch)[0][0, 0] == new_id
    answer.index.save(tmp_path)
    reloaded = ItemIndex.load(tmp_path)
    assert reloaded.search(context, 1)[0][0, 0] == new_id
    with_candidates = pad_and_stack([{k: v.astype(np.int64) for k, v in _row(2, history=[1, 2], candidates=[3, new_id]).items()}])
    ids, scores = answer(with_candidates)
    assert ids[0, 0] == new_id and scores[0, 0] == pytest.approx(float(context[0] @ vector), rel=1e-5)
    hidden = pad_and_stack([{k: v.astype(np.int64) for k, v in _row(2, history=[new_id]).items()}])
    assert new_id not in answer(hidden)[0][0].tolist()


def test_add_rejects_known_ids_and_wrong_widths(ranker):
    index = ItemIndex.build(item_vectors(ranker.to_plain()))
    with pytest.raises(ValueError, match="must be new"):
        index.add([NUM_ITEMS], np.zeros((1, 16)))
    index.add([NUM_ITEMS + 1], np.zeros((1, 16)))
    with pytest.raises(ValueError, match="must be new"):
        index.add([NUM_ITEMS + 1], np.zeros((1, 16)))
    with pytest.raises(ValueError, match="8-d, the index is 16-d"):
        index.add([NUM_ITEMS + 2], np.zeros((1, 8)))
    with pytest.raises(ValueError, match="index kind"):
        IndexOptions("ivf")


def test_context_graph_reads_the_item_table_as_an_input(flat_dir, ranker):
    graph = onnx.load(str(flat_dir / CONTEXT_MODEL_FILE)).graph
    table = ranker.to_plain().item_tower.table.numpy()
    assert not [t.name for t in graph.initializer if t.dims and t.dims[0] >= NUM_ITEMS]  # no catalogue-sized weight
    assert TABLE_INPUT in [i.name for i in graph.input]
    np.testing.assert_array_equal(np.load(flat_dir / ITEM_TABLE_FILE), table)
    answer = load_two_stage(flat_dir, TOP_K)
    assert isinstance(answer.index.item_table, np.memmap)  # read in place, not loaded


def test_context_graph_refuses_the_requests_the_exact_graph_refuses(flat_dir, session, plain_topk):
    """The generated contract battery: each bad request is refused by both graphs naming the same
    field; each other request gets the exact graph's answer from the two stages."""
    answer = load_two_stage(flat_dir, TOP_K)
    outcomes = {"refused": 0, "answered": 0}
    for arrays, field in generated_cases(240, seed=24):
        if field is None:
            assert_same_answer(answer(arrays), tuple(session.run(OUTPUT_NAMES, arrays)))
            outcomes["answered"] += 1
            continue
        for graph in (lambda a: session.run(OUTPUT_NAMES, a), answer.context):
            with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=f"Name:'{field}: "):
                graph(arrays)
        outcomes["refused"] += 1
    assert min(outcomes.values()) > 60, outcomes


def _fresh_ranker(similarity="dot"):
    """A model whose score adds a boost to its fresh items (ids 1-9 never trained on)."""
    from conftest import item_features
    from unirank.model.catalogue import Catalogue
    from unirank.model.ranker import RankerConfig, UnifiedRanker

    torch.manual_seed(5)
    counts = torch.tensor([0] + [0] * 9 + [3] * (NUM_ITEMS - 9) + [0])
    config = RankerConfig(num_items=NUM_ITEMS, num_attributes=10, num_words=60, dim=16, num_heads=2, max_history=12,
                          max_query_len=6, similarity=similarity, temperature=1.0 if similarity == "dot" else 0.1,
                          fresh_boost=4.0)
    return UnifiedRanker(config, Catalogue(*item_features(5), item_counts=counts)).eval()


def test_the_fresh_boost_is_a_column_of_the_index_and_two_stage_answers_as_the_graph(tmp_path):
    plain = _fresh_ranker().to_plain()
    assert plain.terms["fresh"].two_stage
    index = export_two_stage(plain, tmp_path, IndexOptions("flat"))
    assert index.meta["bias"] and index.meta["dim"] == 17
    answer, reference = load_two_stage(tmp_path, TOP_K), TopKRanker(plain, TOP_K).eval()
    for batch in random_batches(metadata(), vocab_size=60, requests=48, seed=6):
        ids, scores = answer(batch)
        assert_same_answer((ids, scores), torch_topk(reference, batch))
        assert (np.isin(ids[:, :3], np.arange(1, 10)) | (ids[:, :3] == 0)).mean() > 0.5  # the boost shows
    # an item added to the index later carries its own boost
    index = ItemIndex.load(tmp_path)
    vector = index.index.reconstruct(20)[:16]
    index.add([NUM_ITEMS + 5], vector[None], bias=4.0)
    context = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    scores = index.added_scores(context, np.array([[NUM_ITEMS + 5]]))
    np.testing.assert_allclose(scores[0, 0], context[0] @ vector + 4.0, rtol=1e-5)


def test_a_boost_with_cosine_similarity_is_refused_for_the_index(tmp_path):
    with pytest.raises(ValueError, match="needs similarity 'dot'"):
        export_two_stage(_fresh_ranker("cosine").to_plain(), tmp_path, IndexOptions("flat"))
