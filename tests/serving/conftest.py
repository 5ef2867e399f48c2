"""Fixtures: a tiny randomly initialised UnifiedRanker, its ONNX export, repositories and a live server."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unirank.model.catalogue import Catalogue

from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.tokenizer import WordTokenizer
from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session
from unirank.serving.model_repository import build_model_repository
from unirank.serving.server import Server, free_port

NUM_ITEMS, NUM_WORDS, TOP_K = 300, 60, 20


def item_features(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Attribute ids and content-word ids per item id (row 0 = padding)."""
    rng = np.random.default_rng(seed)
    attributes = [[]] + [rng.integers(0, 10, size=2).tolist() for _ in range(NUM_ITEMS)]
    words = [[]] + [rng.integers(2, NUM_WORDS, size=3).tolist() for _ in range(NUM_ITEMS)]
    return attributes, words


def make_ranker(seed: int = 0, **overrides) -> UnifiedRanker:
    torch.manual_seed(seed)
    attributes, words = item_features(seed)
    config = RankerConfig(num_items=NUM_ITEMS, num_attributes=10, num_words=NUM_WORDS, dim=16, num_heads=2,
                          max_history=12, max_query_len=6, **overrides)
    return UnifiedRanker(config, Catalogue(attributes, words)).eval()


@pytest.fixture(scope="session")
def ranker() -> UnifiedRanker:
    return make_ranker()


@pytest.fixture(scope="session")
def plain_topk(ranker) -> TopKRanker:
    """The PyTorch reference for every served answer."""
    return TopKRanker(ranker.to_plain(), TOP_K).eval()


@pytest.fixture(scope="session")
def tokenizer() -> WordTokenizer:
    return WordTokenizer([f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(NUM_WORDS - 2)])


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, ranker, tokenizer):
    out = tmp_path_factory.mktemp("export")
    export_onnx(ranker.to_plain(), out, top_k=TOP_K, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def session(export_dir):
    return onnx_session(export_dir / "model.onnx")


@pytest.fixture(scope="session")
def repositories(tmp_path_factory, export_dir):
    return build_model_repository(export_dir, tmp_path_factory.mktemp("repo"), max_batch_size=32)


@pytest.fixture(scope="session")
def server(repositories):
    with Server(repositories["python"], free_port(), free_port(), free_port(), startup_timeout_s=90) as running:
        yield running


def torch_topk(plain_topk: TopKRanker, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch top-k for request arrays ([B] row fields, [B, L] sequences)."""
    from unirank.model.request import INPUT_NAMES

    with torch.no_grad():
        ids, scores = plain_topk(*(torch.from_numpy(np.asarray(arrays[n])) for n in INPUT_NAMES))
    return ids.numpy(), scores.numpy()


# The python flavour's fixed sequence widths for the tiny model (model_repository.sequence_widths).
WIDTHS = {"history": 12, "query": 6, "candidates": 10_000, "exclude": 1_000}


def raw_inputs(arrays: dict[str, np.ndarray], widths: dict[str, int] = WIDTHS) -> list:
    """gRPC inputs of any dtype/shape, as given; 1-D row fields go as [B, 1] like the typed client sends them,
    2-D sequences narrower than `widths` are right-padded with 0 to it (as the typed client does)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    from unirank.model.request import ROW_FIELDS

    inputs = []
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        if name in ROW_FIELDS and value.ndim == 1:
            value = value[:, None]
        if value.ndim == 2 and value.shape[1] < widths.get(name, 0):
            value = np.pad(value, ((0, 0), (0, widths[name] - value.shape[1])))
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs
