"""Two-stage serving through the real tritonserver: `unirank export --index` writes a repository whose
python model answers from the context graph + item index, and the unchanged client gets the exact
graph's answers (flat index); an item added to the versioned index is served without a rebuild."""
from __future__ import annotations

import json

import pytest

from conftest import NUM_ITEMS, TOP_K, item_features, make_ranker
from test_serving_server import CALLS, assert_same_as_pytorch, call_case
from unirank.model.catalogue import Catalogue
from unirank.serving.client import RankerClient, Ranking
from unirank.serving.onnx_graph import TopKRanker
from unirank.serving.item_index import INDEX_META_FILE, ItemIndex
from unirank.serving.model_repository import InvalidModelRepository, validate_model_repository
from unirank.serving.server import Server, free_port
from unirank.cli.main import main as cli

pytest.importorskip("faiss")
NEW_ITEM = NUM_ITEMS + 7


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    from unirank.training.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("two_stage")
    ranker = make_ranker(seed=2)
    save_checkpoint(out / "ckpt.pt", ranker, Catalogue(*item_features(2), tokenizer=tokenizer.to_dict()), config_yaml="",
                    metadata={})
    assert cli(["export", "--checkpoint", str(out / "ckpt.pt"), "--out", str(out / "export"), "--top-k", str(TOP_K),
                "--index", "flat"]) == 0
    version = out / "export" / "repository" / "python" / "unirank" / "1"
    # a new item (content path vector) along the pre-query context of history [1, 2]: retrievable at once
    index = ItemIndex.load(version)
    index.add([NEW_ITEM], index.index.reconstruct(5)[None] * 50)
    index.save(version)
    return TopKRanker(ranker.to_plain(), TOP_K).eval(), out / "export" / "repository"


@pytest.fixture(scope="module")
def two_stage_client(exported):
    _, repository = exported
    with Server(repository / "python", free_port(), free_port(), free_port(), startup_timeout_s=90) as server, \
            RankerClient.from_model_dir(server.grpc_url, repository / "python" / "unirank", timeout_s=10) as client:
        yield client


def test_repository_versions_the_index_with_the_model(exported):
    _, repository = exported
    version = repository / "python" / "unirank" / "1"
    assert json.loads((version / INDEX_META_FILE).read_text())["kind"] == "flat"
    assert not (repository / "onnxruntime" / "unirank" / "1" / INDEX_META_FILE).exists()
    validate_model_repository(repository / "python")
    (version / "item_index.faiss").rename(version / "moved.faiss")
    try:
        with pytest.raises(InvalidModelRepository, match="1/item_index.faiss missing"):
            validate_model_repository(repository / "python")
    finally:
        (version / "moved.faiss").rename(version / "item_index.faiss")


@pytest.mark.parametrize("case", CALLS)
def test_two_stage_round_trip_matches_the_exact_graph(case, two_stage_client, exported):
    reference, _ = exported
    ranking, arrays, _ = call_case(two_stage_client, case)
    # the added item is the one difference from the exact graph: the rest is its top-k, in order
    kept = ranking.item_ids != NEW_ITEM
    assert kept.sum() >= len(ranking.item_ids) - 1
    assert_same_as_pytorch(Ranking(ranking.item_ids[kept], ranking.scores[kept]), arrays, reference, int(kept.sum()))


def test_added_item_is_served_and_history_still_hides_it(two_stage_client):
    assert NEW_ITEM in two_stage_client.similar(5, k=TOP_K).item_ids.tolist()
    assert two_stage_client.recommend([3], candidates=[NEW_ITEM, 4], k=2).item_ids.tolist()[0] in (NEW_ITEM, 4)
    assert NEW_ITEM not in two_stage_client.recommend([NEW_ITEM], candidates=[NEW_ITEM, 4], k=2).item_ids.tolist()
