"""Request schema as numpy arrays: the contract's checks (model/request.py RULES) and ragged-batch
padding, numpy only.

Shared by the client, the Triton python-backend model and the tests. The model repository holds a
copy of this file and of model/request.py (as request_schema.py) next to its model.py, so that it
needs nothing but numpy and onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # inside a model repository
    from request_schema import (INPUT_NAMES, MAX_CANDIDATES, ROW_FIELDS, RULES, SEQUENCE_LENGTHS, TASK_NAMES, Rule,
                                served_task_ids)
except ImportError:
    from unirank.model.request import (INPUT_NAMES, MAX_CANDIDATES, ROW_FIELDS, RULES, SEQUENCE_LENGTHS, TASK_NAMES,
                                       Rule, served_task_ids)

FIELDS = tuple(INPUT_NAMES)
SEQUENCE_FIELDS = SEQUENCE_LENGTHS
TASK_IDS = {int(task): name for task, name in TASK_NAMES.items()}


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
    max_candidates: int = MAX_CANDIDATES
    num_queries: int = 0  # the query catalogue's size: > 0 = the model answers suggest rows

    @property
    def task_ids(self):
        return served_task_ids(self.num_queries)

    def resolve(self, bound):
        """A rule's bound as a number (limit names are attributes of this object)."""
        return getattr(self, bound) if isinstance(bound, str) and hasattr(self, bound) else bound


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


def broken_value(rule: Rule, request: dict[str, np.ndarray], limits: RequestLimits):
    """None when the request keeps the rule, else the first offending value (for the message)."""
    value = request[rule.field]
    bound = limits.resolve(rule.bound)
    if rule.kind == "batch":
        return 0 if value.shape[0] < 1 else None
    if rule.kind == "width_at_most":
        return value.shape[1] if value.shape[1] > bound else None
    if rule.kind == "set_for_task":
        bad = (request["task"] == bound) & (value == 0)
    elif rule.kind == "one_of":  # a few allowed values: one comparison each, ~5x cheaper than np.isin on one row
        bad = value != bound[0]
        for allowed in bound[1:]:
            bad &= value != allowed
    elif rule.kind in ("at_least", "at_most", "within_width"):
        if rule.kind == "within_width":
            bound = request[bound].shape[1]
        # One reduction without a temporary mask for the common, valid case.
        if rule.kind == "at_least":
            if not value.size or value.min() >= bound:
                return None
            bad = value < bound
        elif not value.size or value.max() <= bound:
            return None
        else:
            bad = value > bound
    else:
        raise ValueError(f"unknown rule kind {rule.kind!r}")
    return value[bad].flat[0] if bad.any() else None


def rule_message(rule: Rule, limits: RequestLimits) -> str:
    return rule.message.format(limit=limits.resolve(rule.bound))


def check_request(arrays: dict[str, np.ndarray], limits: RequestLimits) -> dict[str, np.ndarray]:
    """Validates one (batched) request against RULES; returns it with trailing all-padding columns
    dropped. Ids above num_items are allowed (scored with the OOV embedding); empty history
    (pre-query for a new user) and empty query are valid."""
    request = as_request(arrays)
    for rule in RULES:
        value = broken_value(rule, request, limits)
        if value is not None:
            raise RequestError(rule.field, f"{rule_message(rule, limits)}, got {int(value)}")
    return _drop_trailing_padding(request)


def _drop_trailing_padding(request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Padding beyond the longest row carries nothing; dropping it keeps positions inside the model's table."""
    trimmed = dict(request)
    for sequence, lengths in SEQUENCE_FIELDS.items():
        values = request[sequence]
        if lengths is not None:
            width = int(request[lengths].max(initial=0))
        else:
            used = values.any(axis=0)[::-1]  # per column, last first
            width = len(used) - int(used.argmax()) if used.size and used.any() else 0
        trimmed[sequence] = values[:, :width]
    return trimmed


def pad_and_stack(requests: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates requests along the batch, right-padding sequences with 0 to the longest.

    Sequences get at least one (padding) column: the exported graph rejects zero-width inputs."""
    rows = sum(len(r["task"]) for r in requests)
    batch = {}
    for name in FIELDS:
        if name not in SEQUENCE_FIELDS:
            batch[name] = np.concatenate([r[name] for r in requests]).astype(np.int64, copy=False)
            continue
        # One zero-filled allocation per field, filled row block by row block (np.pad + concatenate
        # allocated every part twice).
        out = np.zeros((rows, max(1, *(r[name].shape[1] for r in requests))), dtype=np.int64)
        start = 0
        for r in requests:
            part = r[name]
            out[start:start + len(part), :part.shape[1]] = part
            start += len(part)
        batch[name] = out
    return batch
