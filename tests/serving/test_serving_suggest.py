"""The suggest task served: a model with a query catalogue exported as the same ONE graph (suggest
rows answered with query ids, parity with PyTorch in mixed batches), the catalogue's texts beside
it, the request contract in both flavours, and a real tritonserver round trip through the typed
client."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import NUM_ITEMS, NUM_WORDS, TOP_K, item_features, torch_topk
from unirank.model.catalogue import Catalogue
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.serving.client import RankerClient
from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
from unirank.serving.metadata import ExportMetadata, OUTPUT_NAMES
from unirank.serving.model_repository import build_model_repository
from unirank.serving.request_arrays import RequestError, RequestLimits, check_request, pad_and_stack
from unirank.serving.server import Server, free_port
from unirank.serving.synthetic_requests import random_batches, random_request

NUM_QUERIES, MAX_HISTORY, MAX_QUERY = 40, 12, 6
SUGGEST = 3
QUERY_TEXTS = [f"query {i}" for i in range(1, NUM_QUERIES + 1)]


def make_suggest_ranker(seed: int = 0) -> UnifiedRanker:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lengths = torch.from_numpy(np.r_[0, rng.integers(1, MAX_QUERY + 1, NUM_QUERIES), 0])
    tokens = torch.from_numpy(rng.integers(2, NUM_WORDS, (NUM_QUERIES + 2, MAX_QUERY)))
    tokens = tokens * (torch.arange(MAX_QUERY).unsqueeze(0) < lengths.unsqueeze(1))
    config = RankerConfig(num_items=NUM_ITEMS, num_attributes=10, num_words=NUM_WORDS, dim=16, num_heads=2,
                          max_history=MAX_HISTORY, max_query_len=MAX_QUERY, num_queries=NUM_QUERIES)
    return UnifiedRanker(config, Catalogue(*item_features(seed), query_tokens=tokens, query_lengths=lengths)).eval()


@pytest.fixture(scope="module")
def suggest_ranker():
    return make_suggest_ranker()


@pytest.fixture(scope="module")
def suggest_topk(suggest_ranker):
    return TopKRanker(suggest_ranker.to_plain(), TOP_K).eval()


@pytest.fixture(scope="module")
def suggest_export(tmp_path_factory, suggest_ranker, tokenizer):
    out = tmp_path_factory.mktemp("suggest_export")
    export_onnx(suggest_ranker.to_plain(), out, top_k=TOP_K, tokenizer=tokenizer, query_texts=QUERY_TEXTS)
    return out


@pytest.fixture(scope="module")
def suggest_session(suggest_export):
    return onnx_session(suggest_export / "model.onnx")


def suggest_row(seed: int, candidates=None) -> dict:
    row = random_request(np.random.default_rng(seed), SUGGEST, NUM_ITEMS, NUM_WORDS, MAX_HISTORY, MAX_QUERY,
                         num_queries=NUM_QUERIES)
    if candidates is not None:
        row["candidates"] = np.array([candidates], dtype=np.int64)
    return row


def test_export_carries_the_query_catalogue(suggest_export):
    metadata = ExportMetadata.load(suggest_export / "export.json")
    assert metadata.num_queries == NUM_QUERIES and metadata.top_k == min(TOP_K, NUM_QUERIES)
    assert json.loads((suggest_export / "queries.json").read_text()) == QUERY_TEXTS


def test_export_refuses_a_catalogue_without_its_texts(tmp_path, suggest_ranker):
    with pytest.raises(ValueError, match="40 texts"):
        export_onnx(suggest_ranker.to_plain(), tmp_path, top_k=TOP_K, query_texts=QUERY_TEXTS[:-1])


def test_onnx_matches_pytorch_on_mixed_batches_with_suggest_rows(suggest_ranker, suggest_topk, suggest_session,
                                                                 suggest_export):
    metadata = ExportMetadata.load(suggest_export / "export.json")
    batches = random_batches(metadata, NUM_WORDS, requests=96, seed=2)
    assert any((b["task"] == SUGGEST).any() and (b["task"] != SUGGEST).any() for b in batches)
    assert parity_max_abs_diff(suggest_topk, suggest_session, batches) <= 1e-4
    assert parity_max_abs_diff(TopKRanker(suggest_ranker, TOP_K).eval(), suggest_session, batches) <= 1e-4


def test_suggest_rows_rank_query_ids_and_the_item_rows_stay_items(suggest_ranker, suggest_session):
    """A suggest row returns query ids in 1..num_queries by the query vectors' scores (its candidates:
    only the known ones, once); the item rows of the same batch answer as a model without queries would."""
    item_row = dict(random_request(np.random.default_rng(3), 2, NUM_ITEMS, NUM_WORDS, MAX_HISTORY, MAX_QUERY),
                    candidates=np.zeros((1, 1), dtype=np.int64))  # the whole item catalogue
    rows = [suggest_row(1), suggest_row(2, [5, 5, 9, NUM_QUERIES + 7, 0]), item_row]
    batch = pad_and_stack(rows)
    ids, scores = suggest_session.run(OUTPUT_NAMES, batch)
    assert sorted(ids[0].tolist()) == sorted(set(ids[0].tolist())) and ids[0].min() >= 1 and ids[0].max() <= NUM_QUERIES
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        context = suggest_ranker(*(tensors[k] for k in ("task", "history", "history_lengths", "query",
                                                        "query_lengths", "source_item")))
        expected = suggest_ranker.score_queries(context[:1])[0, 1: NUM_QUERIES + 1].topk(ids.shape[1])
    assert ids[0].tolist() == (expected.indices + 1).tolist()
    np.testing.assert_allclose(scores[0], expected.values.numpy(), atol=1e-5)
    assert sorted(ids[1][ids[1] > 0].tolist()) == [5, 9] and np.isneginf(scores[1][2:]).all()
    assert ids[2].min() >= 1 and ids[2].max() <= NUM_ITEMS and ids[2].max() > NUM_QUERIES


def test_the_contract_accepts_suggest_only_where_the_model_has_a_catalogue(session, suggest_session):
    """Both flavours' checks: numpy (client, python model) and the graph's (onnxruntime flavour)."""
    row = pad_and_stack([suggest_row(4)])
    item_only = RequestLimits(NUM_ITEMS, MAX_HISTORY, MAX_QUERY)
    with pytest.raises(RequestError, match=r"task: unknown task id \(expected 0 search, 1 similar, 2 prequery\), got 3"):
        check_request(row, item_only)
    with pytest.raises(Exception, match=r"task: unknown task id \(expected 0 search, 1 similar, 2 prequery\)"):
        session.run(OUTPUT_NAMES, row)
    check_request(row, RequestLimits(NUM_ITEMS, MAX_HISTORY, MAX_QUERY, num_queries=NUM_QUERIES))
    suggest_session.run(OUTPUT_NAMES, row)
    bad = dict(row, task=np.array([4]))
    expected = r"task: unknown task id \(expected 0 search, 1 similar, 2 prequery, 3 suggest\)"
    with pytest.raises(RequestError, match=expected + ", got 4"):
        check_request(bad, RequestLimits(NUM_ITEMS, MAX_HISTORY, MAX_QUERY, num_queries=NUM_QUERIES))
    with pytest.raises(Exception, match=expected):
        suggest_session.run(OUTPUT_NAMES, bad)
    negative = dict(row, candidates=np.array([[3, -1]]))
    with pytest.raises(Exception, match="candidates: negative id"):
        suggest_session.run(OUTPUT_NAMES, negative)


@pytest.fixture(scope="module")
def suggest_server(tmp_path_factory, suggest_export):
    repositories = build_model_repository(suggest_export, tmp_path_factory.mktemp("suggest_repo"), max_batch_size=32)
    with Server(repositories["python"], free_port(), free_port(), free_port(), startup_timeout_s=90) as running:
        yield running, repositories


def test_tritonserver_round_trip_suggest_returns_query_ids_and_text(suggest_server, suggest_topk):
    server, repositories = suggest_server
    model_dir = repositories["python"] / "unirank"
    with RankerClient.from_model_dir(server.grpc_url, model_dir, timeout_s=10) as client, \
            RankerClient.from_server(server.grpc_url, timeout_s=10) as remote:
        history = [4, 8, 15, 16]
        got = client.suggest(history, k=10)
        ids, scores = torch_topk(suggest_topk, client.builder.build(SUGGEST, history))
        assert got.query_ids.tolist() == ids[0][:10].tolist()
        np.testing.assert_allclose(got.scores, scores[0][:10], atol=1e-5)
        assert got.texts == [QUERY_TEXTS[i - 1] for i in got.query_ids]
        assert remote.suggest(history, k=10).texts == got.texts  # the catalogue from the model config
        restricted = client.suggest([], candidates=[7, 3, 3], k=5)
        assert sorted(restricted.query_ids.tolist()) == [3, 7]
        assert client.recommend(history, k=5).item_ids.max() <= NUM_ITEMS  # the item tasks, same endpoint
