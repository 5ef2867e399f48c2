"""Request validation and padding shared by the client and the python-backend model."""
from __future__ import annotations

import numpy as np
import pytest

from unirank.model.request import INPUT_NAMES, TASK_NAMES, Task
from unirank.serving.request_arrays import FIELDS, SIMILAR, TASK_IDS, RequestError, RequestLimits, check_request, pad_and_stack

LIMITS = RequestLimits(num_items=100, max_history=4, max_query_len=3)


def request(**fields):
    base = {"task": [2], "history": [[3, 4, 0]], "history_lengths": [2], "query": [[0]], "query_lengths": [0],
            "source_item": [0], "candidates": [[0]]}
    base.update(fields)
    return {k: np.asarray(v, dtype=np.int64) for k, v in base.items()}


@pytest.mark.parametrize("fields, field, message", [
    ({"task": [7]}, "task", "unknown task id 7"),
    ({"task": [1]}, "source_item", "need a source item"),
    ({"history": [[1, 2, 3, 4, 5]], "history_lengths": [5]}, "history", "exceed the model limit 4"),
    ({"query": [[1, 2, 3, 4]], "query_lengths": [4]}, "query", "exceed the model limit 3"),
    ({"history_lengths": [3 + 1]}, "history_lengths", "> padded history length 3"),
    ({"query_lengths": [-1]}, "query_lengths", "negative length"),
    ({"candidates": [[5, -2]]}, "candidates", "negative id -2"),
    ({"source_item": [[1, 2]]}, "source_item", "expected rank 1"),
    ({"history_lengths": [2, 2]}, "history_lengths", "batch dimension 2"),
])
def test_violations_name_the_field(fields, field, message):
    with pytest.raises(RequestError, match=message) as err:
        check_request(request(**fields), LIMITS)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_wrong_dtype_and_missing_input():
    bad = request()
    bad["task"] = bad["task"].astype(np.int32)
    with pytest.raises(RequestError, match="task: dtype int32"):
        check_request(bad, LIMITS)
    del bad["candidates"]
    bad["task"] = bad["task"].astype(np.int64)
    with pytest.raises(RequestError, match="candidates: missing input"):
        check_request(bad, LIMITS)


def test_valid_requests_are_trimmed_and_padded_into_one_batch():
    first = check_request(request(task=[[2]], history=[[3, 4, 0, 0]], history_lengths=[[2]]), LIMITS)
    assert first["task"].shape == (1,) and first["history"].tolist() == [[3, 4]]
    assert first["query"].shape == (1, 0) and first["candidates"].shape == (1, 0)
    second = check_request(request(task=[0], query=[[7, 8, 9]], query_lengths=[3], candidates=[[5, 0, 6, 0]],
                                   history=[[0]], history_lengths=[0]), LIMITS)
    assert second["candidates"].tolist() == [[5, 0, 6]]
    batch = pad_and_stack([first, second])
    assert batch["history"].tolist() == [[3, 4], [0, 0]]
    assert batch["query"].tolist() == [[0, 0, 0], [7, 8, 9]]
    assert batch["candidates"].tolist() == [[0, 0, 0], [5, 0, 6]]
    assert all(v.dtype == np.int64 for v in batch.values())
    # Empty sequences still get one padding column (the graph rejects zero-width inputs).
    assert pad_and_stack([first])["query"].shape == (1, 1)
    # Ids above the catalogue are allowed (scored as OOV); empty pre-query history too.
    check_request(request(history=[[0]], history_lengths=[0], candidates=[[1000]]), LIMITS)


def test_fields_mirror_the_request_schema():
    """request_arrays.py is copied into the model repository, so it cannot import the schema."""
    assert list(FIELDS) == INPUT_NAMES
    assert TASK_IDS == {int(t): name for t, name in TASK_NAMES.items()} and SIMILAR == Task.SIMILAR
