"""Request schema as numpy arrays: validation and ragged-batch padding, numpy only.

Shared by the client, the Triton python-backend model (the file is copied next to its model.py so
the model repository needs nothing but numpy and onnxruntime) and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROW_FIELDS = ("task", "history_lengths", "query_lengths", "source_item")
SEQUENCE_FIELDS = {"history": "history_lengths", "query": "query_lengths", "candidates": None}
FIELDS = ("task", "history", "history_lengths", "query", "query_lengths", "source_item", "candidates")
TASK_IDS = {0: "search", 1: "similar", 2: "prequery"}
SIMILAR = 1


class RequestError(ValueError):
    """A request that violates the schema; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    num_items: int
    max_history: int
    max_query_len: int
    max_candidates: int = 10_000


def as_request(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checks presence, dtype and rank; row fields may come as [B] or [B, 1] (Triton's reshape)."""
    request = {}
    for name in FIELDS:
        if name not in arrays:
            raise RequestError(name, "missing input")
        value = np.asarray(arrays[name])
        if value.dtype != np.int64:
            raise RequestError(name, f"dtype {value.dtype} (expected int64)")
        if name in ROW_FIELDS and value.ndim == 2 and value.shape[1] == 1:
            value = value[:, 0]
        expected_rank = 1 if name in ROW_FIELDS else 2
        if value.ndim != expected_rank:
            raise RequestError(name, f"shape {list(value.shape)} (expected rank {expected_rank})")
        request[name] = value
    batch = request["task"].shape[0]
    for name, value in request.items():
        if value.shape[0] != batch:
            raise RequestError(name, f"batch dimension {value.shape[0]} != task's {batch}")
    return request


def check_request(arrays: dict[str, np.ndarray], limits: RequestLimits) -> dict[str, np.ndarray]:
    """Validates one (batched) request; returns it with trailing all-padding columns dropped.

    Rules: task in {0, 1, 2}; lengths within [0, padded length] and the model's limits (the client
    keeps the most recent `max_history` items and the first `max_query_len` tokens); ids >= 0;
    ids above num_items are allowed (scored with the OOV embedding); similar-item rows need a
    source item. Empty history (pre-query for a new user) and empty query are valid.
    """
    request = as_request(arrays)
    unknown = sorted(set(request["task"].tolist()) - set(TASK_IDS))
    if unknown:
        raise RequestError("task", f"unknown task id {unknown[0]} (expected 0 search, 1 similar, 2 prequery)")
    for sequence, limit in (("history", limits.max_history), ("query", limits.max_query_len)):
        lengths = request[f"{sequence}_lengths"]
        if (lengths < 0).any():
            raise RequestError(f"{sequence}_lengths", f"negative length {int(lengths.min())}")
        if (lengths > request[sequence].shape[1]).any():
            raise RequestError(f"{sequence}_lengths", f"length {int(lengths.max())} > padded {sequence} length {request[sequence].shape[1]}")
        if (lengths > limit).any():
            raise RequestError(sequence, f"{int(lengths.max())} entries exceed the model limit {limit}")
    if request["candidates"].shape[1] > limits.max_candidates:
        raise RequestError("candidates", f"{request['candidates'].shape[1]} candidates exceed the limit {limits.max_candidates}")
    for name in ("history", "query", "source_item", "candidates"):
        if request[name].size and request[name].min() < 0:
            raise RequestError(name, f"negative id {int(request[name].min())}")
    if ((request["task"] == SIMILAR) & (request["source_item"] == 0)).any():
        raise RequestError("source_item", "similar-item rows need a source item (got 0)")
    return _drop_trailing_padding(request)


def _drop_trailing_padding(request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Padding beyond the longest row carries nothing; dropping it keeps positions inside the model's table."""
    trimmed = dict(request)
    for sequence, lengths in SEQUENCE_FIELDS.items():
        values = request[sequence]
        if lengths is not None:
            width = int(request[lengths].max(initial=0))
        else:
            nonzero = np.nonzero((values != 0).any(axis=0))[0]
            width = int(nonzero[-1]) + 1 if nonzero.size else 0
        trimmed[sequence] = values[:, :width]
    return trimmed


def pad_and_stack(requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates requests along the batch, right-padding sequences with 0 to the longest.

    Sequences get at least one (padding) column: the exported graph rejects zero-width inputs."""
    batch = {}
    for name in FIELDS:
        parts = [r[name] for r in requests]
        if name in SEQUENCE_FIELDS:
            width = max(1, *(p.shape[1] for p in parts))
            parts = [np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts]
        batch[name] = np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.int64)
    return batch
