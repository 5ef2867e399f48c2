"""The request contract (model/request.py RULES) through every flavour: generated bad and
rule-bound requests against the python flavour (numpy checks + ONNX Runtime), the bare graph
(onnxruntime flavour: checks inside the graph) and the python flavour in the real tritonserver.
Every bad request is refused naming its field by all three; every other request gets the same
answer from all three and PyTorch; a known-good request after every 50 cases stays exact."""
from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import NUM_ITEMS, NUM_WORDS, raw_inputs, torch_topk
from unirank.model.request import ID_FIELDS, INPUT_NAMES, MAX_CANDIDATES, Task
from unirank.serving.metadata import OUTPUT_NAMES
from unirank.serving.request_arrays import RequestError, RequestLimits, check_request, pad_and_stack
from unirank.serving.synthetic_requests import random_request

LIMITS = RequestLimits(NUM_ITEMS, max_history=12, max_query_len=6)


def _rows(rng, count=None):
    count = count or int(rng.integers(1, 5))
    return [random_request(rng, int(rng.integers(0, 3)), NUM_ITEMS, NUM_WORDS, LIMITS.max_history, LIMITS.max_query_len)
            for _ in range(count)]


def _set(batch, name, row, value):
    batch[name] = batch[name].copy()
    batch[name][row] = value


def _bad_task(rng, batch, row):
    _set(batch, "task", row, rng.choice([3, 4, 7, 255, -1, -7, 2**31, 2**63 - 1, -2**63]))
    return "task"


def _negative_id(rng, batch, row):
    name = ID_FIELDS[rng.integers(len(ID_FIELDS))]
    if name == "source_item":
        _set(batch, name, row, -int(rng.integers(1, 2**62)))
    else:
        batch[name] = np.pad(batch[name], ((0, 0), (0, 1)), constant_values=0)
        batch[name][row, -1] = -int(rng.integers(1, 10**6))
        if name in ("history", "query"):
            _set(batch, f"{name}_lengths", row, batch[name].shape[1])
            if name == "history" and batch[name].shape[1] > LIMITS.max_history:
                return "history_lengths"  # over the limit is reported first
            if name == "query" and batch[name].shape[1] > LIMITS.max_query_len:
                return "query_lengths"
    return name


def _negative_length(rng, batch, row):
    name = rng.choice(["history_lengths", "query_lengths"])
    _set(batch, name, row, -int(rng.integers(1, 2**62)))
    return name


def _length_beyond_width(rng, batch, row):
    """Padded to the limit first: the python flavour's server pads every sequence to it."""
    sequence, limit = [("history", LIMITS.max_history), ("query", LIMITS.max_query_len)][rng.integers(2)]
    batch[sequence] = np.pad(batch[sequence], ((0, 0), (0, limit - batch[sequence].shape[1])))
    _set(batch, f"{sequence}_lengths", row, limit + int(rng.integers(1, 3)))
    return f"{sequence}_lengths"


def _over_the_limit(rng, batch, row):
    sequence, limit = [("history", LIMITS.max_history), ("query", LIMITS.max_query_len)][rng.integers(2)]
    width = limit + int(rng.integers(1, 5))
    batch[sequence] = np.pad(batch[sequence], ((0, 0), (0, width - batch[sequence].shape[1])), constant_values=3)
    _set(batch, f"{sequence}_lengths", row, width)
    return f"{sequence}_lengths"


def _similar_without_source(rng, batch, row):
    _set(batch, "task", row, int(Task.SIMILAR))
    _set(batch, "source_item", row, 0)
    return "source_item"


def _too_many_candidates(rng, batch, row):
    width = MAX_CANDIDATES + int(rng.integers(1, 10))
    batch["candidates"] = rng.integers(1, NUM_ITEMS + 1, size=(len(batch["task"]), width))
    return "candidates"


def _empty_batch(rng, batch, row):
    """Zero rows; sequences keep their width or have none (the request that used to crash tritonserver)."""
    keep_width = rng.random() < 0.5
    for name in INPUT_NAMES:
        batch[name] = batch[name][:0] if keep_width or batch[name].ndim == 1 else batch[name][:0, :0]
    return "task"


BAD = [_bad_task, _negative_id, _negative_length, _length_beyond_width, _over_the_limit, _similar_without_source,
       _too_many_candidates, _empty_batch]


def _duplicates(rng, batch, row):
    ids = rng.integers(1, NUM_ITEMS + 1, size=int(rng.integers(1, 4)))
    batch["candidates"] = np.tile(np.repeat(ids, rng.integers(2, 25, size=ids.size)), (len(batch["task"]), 1))


def _history_in_candidates(rng, batch, row):
    """History items known and unknown to the model, also offered as candidates."""
    history = np.concatenate([rng.integers(1, NUM_ITEMS + 1, 3), NUM_ITEMS + rng.integers(1, 10**9, 2)])
    batch["history"] = np.tile(history, (len(batch["task"]), 1))
    batch["history_lengths"] = np.full(len(batch["task"]), history.size)
    candidates = np.concatenate([history, rng.integers(1, NUM_ITEMS + 1, 8)])
    batch["candidates"] = np.tile(rng.permutation(candidates), (len(batch["task"]), 1))


def _unknown_ids(rng, batch, row):
    batch["candidates"] = np.pad(batch["candidates"], ((0, 0), (0, 2)), constant_values=NUM_ITEMS + 1)
    _set(batch, "source_item", row, NUM_ITEMS + int(rng.integers(1, 2**62)) if batch["task"][row] == 1 else 0)


def _trailing_padding(rng, batch, row):
    """Up to the limit: the python flavour's config fixes each sequence's width there (Triton refuses wider)."""
    for sequence, limit in (("history", LIMITS.max_history), ("query", LIMITS.max_query_len)):
        room = limit - batch[sequence].shape[1]
        batch[sequence] = np.pad(batch[sequence], ((0, 0), (0, int(rng.integers(0, room + 1)) if room > 0 else 0)))


GOOD = [_duplicates, _history_in_candidates, _unknown_ids, _trailing_padding, lambda rng, batch, row: None]


def generated_cases(count: int, seed: int = 0):
    """(arrays, field) pairs: field is the input a bad request must be refused for, None for a valid one."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        batch = {k: v.astype(np.int64) for k, v in pad_and_stack(_rows(rng)).items()}
        row = int(rng.integers(len(batch["task"])))
        mutate = (BAD + GOOD)[i % (len(BAD) + len(GOOD))]
        field = mutate(rng, batch, row)
        yield {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in batch.items()}, field


@pytest.fixture(scope="module")
def grpc(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


def python_flavour(session, arrays):
    return session.run(OUTPUT_NAMES, pad_and_stack([check_request(arrays, LIMITS)]))


def graph_flavour(session, arrays):
    return session.run(OUTPUT_NAMES, arrays)


def server_flavour(grpc, arrays):
    result = grpc.infer("unirank", raw_inputs(arrays), client_timeout=30)
    return result.as_numpy("item_ids"), result.as_numpy("scores")


def assert_refused(field, session, grpc, arrays):
    with pytest.raises(RequestError) as err:
        python_flavour(session, arrays)
    assert err.value.field == field, err.value
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=f"Name:'{field}: "):
        graph_flavour(session, arrays)
    with pytest.raises(InferenceServerException) as err:
        server_flavour(grpc, arrays)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
    # Triton refuses some empty batches itself ("input byte size mismatch for input ..."), and a
    # sequence wider than the python flavour's fixed width (its limit) names the sequence.
    message = err.value.message()
    wider = re.search(r"unexpected shape for input '(\w+)'", message)
    assert message.startswith(f"{field}: ") or (wider and field.startswith(wider.group(1))) or not len(arrays["task"]), message


def assert_rules_kept(arrays, ids):
    for b, row in enumerate(ids):
        shown = row[row != 0]
        assert len(set(shown.tolist())) == len(shown), "an id is returned twice"
        if arrays["task"][b] == Task.SIMILAR:
            assert arrays["source_item"][b] not in shown
        else:
            assert not set(arrays["history"][b, : arrays["history_lengths"][b]].tolist()) & set(shown.tolist())
        offered = set(arrays["candidates"][b].tolist()) - {0}
        if offered:
            assert set(shown.tolist()) <= offered


def assert_answered(plain_topk, session, grpc, arrays):
    expected_ids, expected_scores = torch_topk(plain_topk, pad_and_stack([check_request(arrays, LIMITS)]))
    finite = np.isfinite(expected_scores)
    for ids, scores in (python_flavour(session, arrays), graph_flavour(session, arrays), server_flavour(grpc, arrays)):
        assert np.array_equal(np.isfinite(scores), finite)
        np.testing.assert_allclose(scores[finite], expected_scores[finite], atol=1e-5)
        assert_rules_kept(arrays, ids)


@pytest.mark.parametrize("count", [300, pytest.param(1200, marks=pytest.mark.slow)])
def test_every_flavour_refuses_and_answers_alike(count, plain_topk, session, grpc):
    known_good = pad_and_stack(_rows(np.random.default_rng(99), count=3))
    reference = [f(known_good) for f in (lambda a: python_flavour(session, a), lambda a: graph_flavour(session, a),
                                         lambda a: server_flavour(grpc, a))]
    outcomes = {"refused": 0, "answered": 0}
    for i, (arrays, field) in enumerate(generated_cases(count, seed=count)):
        if field is None:
            assert_answered(plain_topk, session, grpc, arrays)
        else:
            assert_refused(field, session, grpc, arrays)
        outcomes["refused" if field else "answered"] += 1
        if i % 50 == 49:
            again = [python_flavour(session, known_good), graph_flavour(session, known_good), server_flavour(grpc, known_good)]
            for (ids, scores), (want_ids, want_scores) in zip(again, reference):
                assert np.array_equal(ids, want_ids) and np.array_equal(scores, want_scores)
    assert min(outcomes.values()) >= count // 3
    assert grpc.is_server_live() and grpc.is_model_ready("unirank")


@pytest.mark.parametrize("field, rows", [("candidates", 0), ("query_lengths", 0), ("history", 2), ("source_item", 3)])
def test_the_bare_graph_refuses_inputs_with_another_batch_size(field, rows, session):
    """0-row candidates beside 1-row inputs made ONNX Runtime divide by zero (SIGFPE); 0-row
    query_lengths got an answer. The graph checks every input's rows against task's first."""
    arrays = pad_and_stack(_rows(np.random.default_rng(5), count=1))
    arrays[field] = np.repeat(arrays[field][:1], rows, axis=0) if rows else arrays[field][:0]
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match=f"Name:'{field}: batch dimension != task's'"):
        graph_flavour(session, arrays)
    with pytest.raises(RequestError, match=f"{field}: batch dimension"):
        python_flavour(session, arrays)
