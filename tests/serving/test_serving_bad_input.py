"""Bad input through the real server: each case is an INVALID_ARGUMENT naming the field, or follows a
documented rule (unknown ids -> OOV, empty history -> valid); the server stays up and the next valid
request still returns exactly PyTorch's answer."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import NUM_ITEMS, NUM_WORDS, WIDTHS, raw_inputs, torch_topk
from unirank.serving.request_arrays import pad_and_stack
from unirank.serving.synthetic_requests import random_request

MAX_BATCH, MAX_HISTORY, MAX_QUERY = 32, 12, 6


@pytest.fixture(scope="module")
def grpc(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


def send(grpc, arrays):
    result = grpc.infer("unirank", raw_inputs(arrays), client_timeout=10)
    return result.as_numpy("item_ids"), result.as_numpy("scores")


def valid(seed: int = 0, task: int = 2) -> dict[str, np.ndarray]:
    return pad_and_stack([random_request(np.random.default_rng(seed), task, NUM_ITEMS, NUM_WORDS, MAX_HISTORY, MAX_QUERY)])


def assert_exact(grpc, plain_topk, arrays):
    ids, scores = send(grpc, arrays)
    expected_ids, expected_scores = torch_topk(plain_topk, arrays)
    assert np.array_equal(np.isfinite(scores), np.isfinite(expected_scores))
    finite = np.isfinite(scores)
    np.testing.assert_allclose(scores[finite], expected_scores[finite], atol=1e-5)
    assert (ids[finite] == expected_ids[finite]).mean() > 0.95  # ties may swap neighbours


def _with(**changes):
    def mutate(arrays):
        arrays = dict(arrays)
        for name, value in changes.items():
            if value is None:
                del arrays[name]
            else:
                arrays[name] = value(arrays) if callable(value) else np.asarray(value)
        return arrays
    return mutate


# (mutation, field named in the error; None = served by a documented rule and checked against PyTorch)
CASES = {
    "history int32": (_with(history=lambda a: a["history"].astype(np.int32)), "history"),
    "task float": (_with(task=lambda a: a["task"].astype(np.float32)), "task"),
    "history rank 1": (_with(history=lambda a: a["history"][0]), "history"),
    "source_item two columns": (_with(source_item=[[3, 4]]), "source_item"),
    "missing query_lengths": (_with(query_lengths=None), "query_lengths"),
    "unknown task": (_with(task=[5]), "task"),
    "negative task": (_with(task=[-1]), "task"),
    "negative history id": (_with(history=[[3, -4]], history_lengths=[2]), "history"),
    "negative candidate": (_with(candidates=[[-1]]), "candidates"),
    "history too long": (_with(history=np.ones((1, MAX_HISTORY + 3), np.int64), history_lengths=[MAX_HISTORY + 3]), "history"),
    "query too long": (_with(task=[0], query=np.full((1, MAX_QUERY + 1), 3), query_lengths=[MAX_QUERY + 1]), "query"),
    "length beyond padding": (_with(history=[[3, 4]], history_lengths=[MAX_HISTORY + 1]), "history_lengths"),
    "similar without source": (_with(task=[1], source_item=[0]), "source_item"),
    "batch above max_batch_size": (lambda a: {k: np.repeat(v, MAX_BATCH + 1, axis=0) for k, v in a.items()}, "batch"),
    "ids beyond the catalogue -> OOV": (_with(history=[[NUM_ITEMS + 7, 2, 10**12]], history_lengths=[3],
                                              candidates=[[NUM_ITEMS + 1, 5, 6]]), None),
    "empty history pre-query": (_with(task=[2], history=[[0]], history_lengths=[0]), None),
    "negative exclude id": (_with(exclude=[[4, -2]], exclude_lengths=[2]), "exclude"),
    "negative exclude length": (_with(exclude=[[4]], exclude_lengths=[-1]), "exclude_lengths"),
    "more exclude ids than the limit": (_with(exclude=np.ones((1, 1_001), np.int64), exclude_lengths=[1_001]),
                                        "exclude"),
    "excluded ids are never answered": (_with(exclude=[[1, 2, 3, 4, 5]], exclude_lengths=[5]), None),
    # The python flavour's sequences have a fixed width (the limit): Triton refuses any other width.
    "padding beyond the limit": (_with(history=lambda a: np.pad(a["history"], ((0, 0), (0, 40)))), "history"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_and_server_recovers(case, grpc, plain_topk):
    mutate, field = CASES[case]
    arrays = mutate(valid(seed=len(case)))
    if field is None:
        assert_exact(grpc, plain_topk, arrays)
    else:
        with pytest.raises(InferenceServerException) as err:
            send(grpc, arrays)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
        assert field in err.value.message()
    assert grpc.is_server_live()
    assert_exact(grpc, plain_topk, valid(seed=1, task=len(case) % 3))


@pytest.mark.parametrize("count", [300, pytest.param(1_200, marks=pytest.mark.slow)])
def test_random_bad_input_battery(grpc, plain_topk, count):
    """`count` requests: random valid rows of every task, each corrupted by a random case (or not);
    every corrupted one is refused naming its field, every other one answers exactly PyTorch's top-k,
    and the server stays up (0 crashes, 0 hangs: each call has a 10 s deadline)."""
    rng = np.random.default_rng(count)
    names = list(CASES)
    outcomes = {"rejected": 0, "served": 0}
    for i in range(count):
        arrays = valid(seed=1000 + i, task=i % 3)
        if rng.random() < 0.8:
            mutate, field = CASES[names[rng.integers(len(names))]]
            arrays = mutate(arrays)
        else:
            field = None
        if field is None:
            assert_exact(grpc, plain_topk, arrays)
            outcomes["served"] += 1
        else:
            with pytest.raises(InferenceServerException, match=field) as err:
                send(grpc, arrays)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
            outcomes["rejected"] += 1
    assert min(outcomes.values()) > 30
    assert grpc.is_server_live() and grpc.is_model_ready("unirank")


def test_concurrent_mix_of_bad_and_valid_requests(server, plain_topk):
    """Requests that arrive together are batched into one python-model execution: a bad request
    in the same batch must not disturb the valid ones' answers."""
    import asyncio

    import tritonclient.grpc.aio as aioclient

    names = [name for name, (_, field) in CASES.items() if field is not None]
    requests = []
    for i in range(96):
        arrays = valid(seed=5000 + i, task=i % 3)
        field = None
        if i % 3 == 0:
            mutate, field = CASES[names[i % len(names)]]
            arrays = mutate(arrays)
        requests.append((arrays, field))

    async def run():
        async with aioclient.InferenceServerClient(server.grpc_url) as client:
            calls = [client.infer("unirank", raw_inputs(arrays), client_timeout=30) for arrays, _ in requests]
            return await asyncio.gather(*calls, return_exceptions=True)

    for (arrays, field), outcome in zip(requests, asyncio.run(run())):
        if field is None:
            assert not isinstance(outcome, Exception), outcome
            expected_ids, expected_scores = torch_topk(plain_topk, arrays)
            finite = np.isfinite(expected_scores)
            np.testing.assert_allclose(outcome.as_numpy("scores")[finite], expected_scores[finite], atol=1e-5)
        else:
            assert isinstance(outcome, InferenceServerException) and field in outcome.message()
            assert outcome.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("field, shape, values", [
    ("history", [1, 2**61], 0),  # 2**61 * 8 bytes wraps to 0 in Triton's byte-size check
    ("history", [1, 2**61 + 1], 1),  # wraps to 8 bytes
    ("query", [1, 2**61], 0),
    ("candidates", [1, 2**61], 0),
])
def test_a_shape_whose_byte_size_overflows_is_refused_before_the_stub(field, shape, values, server, grpc, plain_topk):
    """Such a shape passed Triton's byte-size check, and the python backend's stub aborted building
    the array: every later request failed until a heal. Fixed widths make Triton refuse it."""
    from unirank.serving.supervisor import stub_pids

    stubs = stub_pids(server.process.pid)
    arrays = valid()
    arrays[field] = np.zeros((1, values), np.int64)
    inputs = raw_inputs(arrays, widths={k: w for k, w in WIDTHS.items() if k != field})
    next(i for i in inputs if i.name() == field).set_shape(shape)
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("unirank", inputs, client_timeout=10)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and f"unexpected shape for input '{field}'" in err.value.message()
    assert stub_pids(server.process.pid) == stubs  # the same stub, alive
    assert_exact(grpc, plain_topk, valid(seed=2))


@pytest.mark.parametrize("width", [0, 1, None])  # None: each sequence at its fixed width
def test_a_batch_of_zero_rows_is_refused_and_the_server_stays_up(width, server, grpc, plain_topk):
    """0 rows with zero-width sequences reached the python backend through a config with reshaped
    row fields and variable widths, and tritonserver died (SIGSEGV in libtriton_python.so)."""
    from unirank.serving.supervisor import stub_pids

    stubs = stub_pids(server.process.pid)
    arrays = {name: value[:0] if value.ndim == 1 or width is None else value[:0, :width] for name, value in valid().items()}
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("unirank", raw_inputs(arrays, widths=WIDTHS if width is None else {}), client_timeout=10)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value.message()
    assert server.process.poll() is None and stub_pids(server.process.pid) == stubs
    assert_exact(grpc, plain_topk, valid(seed=3))
