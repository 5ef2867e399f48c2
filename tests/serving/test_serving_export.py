"""ONNX export: parity with PyTorch on every task, and the ranking rules baked into the graph."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import NUM_ITEMS, NUM_WORDS, TOP_K, item_features, make_ranker
from unirank.model.catalogue import Catalogue
from unirank.serving.onnx_graph import TopKRanker, parity_max_abs_diff
from unirank.serving.metadata import ExportMetadata, OUTPUT_NAMES
from unirank.serving.request_arrays import pad_and_stack
from unirank.serving.synthetic_requests import random_batches, random_request

PARITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def metadata(export_dir) -> ExportMetadata:
    return ExportMetadata.load(export_dir / "export.json")


def test_export_writes_graph_tokenizer_and_metadata(export_dir, metadata, tokenizer):
    assert (export_dir / "model.onnx").stat().st_size > 0
    assert (export_dir / "tokenizer.json").read_text() == __import__("json").dumps(tokenizer.to_dict())
    assert (metadata.num_items, metadata.top_k, metadata.max_history, metadata.max_query_len) == (NUM_ITEMS, TOP_K, 12, 6)


@pytest.mark.parametrize("task", [0, 1, 2])
def test_onnx_matches_pytorch_per_task(task, ranker, plain_topk, session, metadata):
    rng = np.random.default_rng(task)
    rows = [random_request(rng, task, NUM_ITEMS, NUM_WORDS, metadata.max_history, metadata.max_query_len) for _ in range(96)]
    batches = [pad_and_stack(rows[i : i + 32]) for i in range(0, len(rows), 32)]
    diff = parity_max_abs_diff(plain_topk, session, batches)
    print(f"task {task}: ORT vs plain PyTorch max abs diff {diff:.3g}")
    assert diff <= PARITY_TOLERANCE
    # ...and against the TorchRec model itself (checks to_plain as exported).
    assert parity_max_abs_diff(TopKRanker(ranker, TOP_K).eval(), session, batches) <= PARITY_TOLERANCE


def test_parity_check_catches_a_different_model(session, metadata):
    other = TopKRanker(make_ranker(seed=1).to_plain(), TOP_K).eval()
    batches = random_batches(metadata, NUM_WORDS, requests=32)
    assert parity_max_abs_diff(other, session, batches) > 1e-2


def test_batch_composition_does_not_change_a_row(session, metadata):
    """Padding a row into a wider batch (ragged batching in the server) leaves its answer unchanged."""
    batches = random_batches(metadata, NUM_WORDS, requests=24, batch_size=24, seed=3)
    full_ids, full_scores = session.run(OUTPUT_NAMES, batches[0])
    for row in (0, 1, 2, 13):
        alone = {name: value[row : row + 1] for name, value in batches[0].items()}
        ids, scores = session.run(OUTPUT_NAMES, alone)
        finite = np.isfinite(scores[0])
        np.testing.assert_allclose(scores[0][finite], full_scores[row][finite], atol=1e-5)


def _run(session, **fields):
    base = {"task": [2], "history": [[0]], "history_lengths": [0], "query": [[0]], "query_lengths": [0],
            "source_item": [0], "candidates": [[0]], "exclude": [[0]], "exclude_lengths": [0]}
    base.update(fields)
    feed = {k: np.asarray(v, dtype=np.int64) for k, v in base.items()}
    ids, scores = session.run(OUTPUT_NAMES, feed)
    return ids[0], scores[0]


def test_whole_catalogue_excludes_history_and_candidates_rank_only_themselves(session, plain_topk):
    history = [5, 9, 17, 33]
    ids, scores = _run(session, task=[2], history=[history], history_lengths=[4])
    assert len(ids) == TOP_K and (ids >= 1).all() and (ids <= NUM_ITEMS).all()
    assert not set(history) & set(ids.tolist())
    assert (np.diff(scores) <= 0).all()
    # All of the catalogue's best items as candidates (plus a history item and padding): same order.
    cands = [[*ids[:5].tolist(), history[0], 0, 0]]
    cand_ids, cand_scores = _run(session, task=[2], history=[history], history_lengths=[4], candidates=cands)
    assert cand_ids[:5].tolist() == ids[:5].tolist()
    np.testing.assert_allclose(cand_scores[:5], scores[:5], atol=1e-5)
    assert (cand_ids[5:] == 0).all() and np.isneginf(cand_scores[5:]).all()  # unfillable slots


def test_similar_item_never_returns_the_source_and_ignores_history(session):
    source = int(_run(session, task=[2])[0][0])  # an item that would otherwise rank first
    ids, _ = _run(session, task=[1], source_item=[source], candidates=[[source, 7, 8]])
    assert ids[:2].tolist() and source not in ids.tolist() and set(ids[:2].tolist()) == {7, 8}
    with_history, _ = _run(session, task=[1], source_item=[source], history=[[source, 3]], history_lengths=[2])
    without, _ = _run(session, task=[1], source_item=[source])
    assert with_history.tolist() == without.tolist()


def test_unknown_ids_use_oov_and_task_id_does_matter(session):
    out_of_range, _ = _run(session, task=[2], history=[[NUM_ITEMS + 50, 4]], history_lengths=[2])
    oov, _ = _run(session, task=[2], history=[[NUM_ITEMS + 1, 4]], history_lengths=[2])
    assert out_of_range.tolist() == oov.tolist()
    search, _ = _run(session, task=[0], query=[[3, 4]], query_lengths=[2])
    assert search.tolist() != _run(session, task=[2])[0].tolist()


@pytest.mark.parametrize("block", ["prenorm", "ligr"])
def test_export_model_from_checkpoint(tmp_path, block, tokenizer):
    from unirank.serving.export import export_model
    from unirank.training.checkpoint import save_checkpoint

    ranker = make_ranker(block=block)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, ranker, Catalogue(*item_features(0), tokenizer=tokenizer.to_dict()), config_yaml="", metadata={})
    report = export_model(path, tmp_path / "export", top_k=TOP_K, parity_requests=48)
    assert report.max_abs_diff is not None and report.max_abs_diff <= PARITY_TOLERANCE
    assert (tmp_path / "export" / "tokenizer.json").exists()
