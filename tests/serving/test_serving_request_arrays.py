"""Request validation and padding shared by the client and the python-backend model."""
from __future__ import annotations

import numpy as np
import pytest

from unirank.model.request import INPUT_NAMES, SEQUENCE_LENGTHS, TASK_NAMES
from unirank.serving.request_arrays import (FIELDS, TASK_IDS, RequestError, RequestLimits, StackBuffers, check_request,
                                           pad_and_stack)

LIMITS = RequestLimits(num_items=100, max_history=4, max_query_len=3)


def request(**fields):
    base = {"task": [2], "history": [[3, 4, 0]], "history_lengths": [2], "query": [[0]], "query_lengths": [0],
            "source_item": [0], "candidates": [[0]], "exclude": [[0]], "exclude_lengths": [0]}
    base.update(fields)
    return {k: np.asarray(v, dtype=np.int64) for k, v in base.items()}


@pytest.mark.parametrize("fields, field, message", [
    ({"task": [7]}, "task", r"unknown task id \(expected 0 search, 1 similar, 2 prequery\), got 7"),
    ({"task": [2, -1], "history_lengths": [2, 2], "query_lengths": [0, 0], "source_item": [0, 0],
      "history": [[3, 4, 0]] * 2, "query": [[0]] * 2, "candidates": [[0]] * 2,
      "exclude": [[0]] * 2, "exclude_lengths": [0, 0]}, "task", "unknown task id .*got -1"),
    ({"task": [1]}, "source_item", "need a source item"),
    ({"history": [[1, 2, 3, 4, 5]], "history_lengths": [5]}, "history_lengths", "history longer than the model limit 4, got 5"),
    ({"query": [[1, 2, 3, 4]], "query_lengths": [4]}, "query_lengths", "query longer than the model limit 3, got 4"),
    ({"history_lengths": [3 + 1]}, "history_lengths", "length > padded history width, got 4"),
    ({"query_lengths": [-1]}, "query_lengths", "negative length"),
    ({"candidates": [[5, -2]]}, "candidates", "negative id, got -2"),
    ({"candidates": np.ones((1, 10_001))}, "candidates", "more candidates than the limit 10000, got 10001"),
    ({k: np.zeros((0, 1) if k in SEQUENCE_LENGTHS else (0,)) for k in INPUT_NAMES}, "task", "batch size 0"),
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


def padded(width, **fields):
    """request(**fields) with every sequence right-padded with zeros to `width` (the fixed widths)."""
    base = request(**fields)
    return {k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) if k in SEQUENCE_LENGTHS else v for k, v in base.items()}


@pytest.mark.parametrize("fields, message", [
    ({"candidates": [[5, 0, 0, -2]]}, "candidates: negative id, got -2"),
    ({"exclude": [[0, 0, -3]], "exclude_lengths": [1]}, "exclude: negative id, got -3"),
    ({"history": [[3, 4, 0, -1]]}, "history: negative id, got -1"),  # past its length: checked all the same
    ({"exclude_lengths": [1001]}, "exclude_lengths: length > padded exclude width, got 1001"),
])
def test_requests_at_the_fixed_widths_are_checked_as_before(fields, message):
    with pytest.raises(RequestError, match=message):
        check_request(padded(1000, **fields), LIMITS)


def test_lengths_count_against_the_padded_width_not_the_ids_sent():
    """A length may cover trailing zeros (padding ids): the request is valid and keeps those columns."""
    checked = check_request(padded(1000, exclude=[[7]], exclude_lengths=[3], candidates=[[0, 9]]), LIMITS)
    assert checked["exclude"].tolist() == [[7, 0, 0]] and checked["candidates"].tolist() == [[0, 9]]
    assert checked["history"].tolist() == [[3, 4]] and checked["query"].shape == (1, 0)


def test_reused_buffers_give_fresh_batches():
    rows = [check_request(request(candidates=[[5, 6, 7, 8]], exclude=[[9, 9]], exclude_lengths=[2]), LIMITS),
            check_request(request(history=[[1]], history_lengths=[1]), LIMITS)]
    buffers = StackBuffers()
    first = {k: v.copy() for k, v in pad_and_stack(rows, buffers).items()}
    again = pad_and_stack(rows[::-1], buffers)  # same memory, other order: nothing left over
    expected = pad_and_stack(rows[::-1])
    assert all(np.array_equal(again[k], expected[k]) and again[k].flags.c_contiguous for k in FIELDS)
    assert first["candidates"].tolist() == [[5, 6, 7, 8], [0, 0, 0, 0]] and again["exclude"].tolist() == [[0, 0], [9, 9]]
    # One request with its columns goes through as it is (no copy).
    assert np.shares_memory(pad_and_stack(rows[:1], buffers)["candidates"], rows[0]["candidates"])


def test_fields_come_from_the_request_schema():
    assert list(FIELDS) == INPUT_NAMES
    assert TASK_IDS == {int(t): name for t, name in TASK_NAMES.items()}


def test_schema_and_rules_import_without_torch_or_numpy(tmp_path):
    """The model repository runs request_arrays.py beside a copy of model/request.py."""
    import shutil
    import subprocess
    import sys

    from unirank.model import request
    from unirank.serving import request_arrays

    shutil.copy2(request.__file__, tmp_path / "request_schema.py")
    shutil.copy2(request_arrays.__file__, tmp_path / "request_arrays.py")
    code = ("import sys; import request_arrays; "
            "assert 'torch' not in sys.modules and 'unirank' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={"PYTHONPATH": str(tmp_path)})
