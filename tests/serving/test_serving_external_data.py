"""A graph exported with ONNX external data (what a catalogue past protobuf's 2 GB gets): model.onnx
plus model.onnx.data, equal to PyTorch in ONNX Runtime, carried into both repository flavours, and
served by the real tritonserver from the version directory."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import TOP_K, torch_topk
from test_serving_server import assert_same_as_pytorch, call_case
from unirank.serving.client import RankerClient
from unirank.serving.onnx_graph import export_onnx, onnx_session
from unirank.serving.metadata import OUTPUT_NAMES
from unirank.serving.metadata import MODEL_FILE, external_data_file, external_data_files
from unirank.serving.model_repository import InvalidModelRepository, build_model_repository, validate_model_repository
from unirank.serving.server import Server, free_port
from unirank.serving.synthetic_requests import random_batches

DATA_FILE = external_data_file(MODEL_FILE)


@pytest.fixture(scope="module")
def external(tmp_path_factory, ranker, tokenizer):
    out = tmp_path_factory.mktemp("external")
    metadata = export_onnx(ranker.to_plain(), out / "export", top_k=TOP_K, tokenizer=tokenizer, external_data=True)
    return out, metadata, build_model_repository(out / "export", out / "repository")


def test_weights_live_beside_the_graph_and_answer_as_pytorch(external, plain_topk):
    out, metadata, _ = external
    graph = onnx.load(str(out / "export" / MODEL_FILE), load_external_data=False).graph
    table = [t for t in graph.initializer if t.dims and t.dims[0] == metadata.num_items + 2]
    assert table and all(t.data_location == onnx.TensorProto.EXTERNAL for t in table)
    assert external_data_files(out / "export" / MODEL_FILE) == [DATA_FILE]
    session = onnx_session(out / "export" / MODEL_FILE)
    for batch in random_batches(metadata, vocab_size=60, requests=64, seed=5):
        ids, scores = session.run(OUTPUT_NAMES, batch)
        want_ids, want_scores = torch_topk(plain_topk, batch)
        finite = np.isfinite(want_scores)
        assert np.array_equal(np.isfinite(scores), finite)
        np.testing.assert_allclose(scores[finite], want_scores[finite], atol=1e-5)


def test_both_flavours_carry_the_data_file(external):
    _, _, repositories = external
    for root in repositories.values():
        version = root / "unirank" / "1"
        assert (version / DATA_FILE).exists()
        validate_model_repository(root)
    version = repositories["onnxruntime"] / "unirank" / "1"
    (version / DATA_FILE).rename(version / "moved.data")
    try:
        with pytest.raises(InvalidModelRepository, match=f"1/{DATA_FILE} missing"):
            validate_model_repository(repositories["onnxruntime"])
    finally:
        (version / "moved.data").rename(version / DATA_FILE)


@pytest.mark.parametrize("case", ["search", "similar_candidates", "recommend"])
def test_served_from_external_data_through_tritonserver(case, external, plain_topk, served_external):
    ranking, arrays, kwargs = call_case(served_external, case)
    assert_same_as_pytorch(ranking, arrays, plain_topk, kwargs["k"])


@pytest.fixture(scope="module")
def served_external(external):
    _, _, repositories = external
    with Server(repositories["python"], free_port(), free_port(), free_port(), startup_timeout_s=90) as server, \
            RankerClient.from_model_dir(server.grpc_url, repositories["python"] / "unirank", timeout_s=10) as client:
        yield client
