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


def broken_value(rule: Rule, request: dict[str, np.ndarray], limits: RequestLimits, widths: dict[str, int] | None = None):
    """None when the request keeps the rule, else the first offending value (for the message).
    `widths`: the sequences' padded widths when `request` holds them trimmed (default: their shapes)."""
    value = request[rule.field]
    bound = limits.resolve(rule.bound)
    if rule.kind == "batch":
        return 0 if value.shape[0] < 1 else None
    if rule.kind == "width_at_most":
        width = widths[rule.field] if widths else value.shape[1]
        return width if width > bound else None
    if rule.kind == "set_for_task":
        bad = (request["task"] == bound) & (value == 0)
    elif rule.kind == "one_of":  # a few allowed values: one comparison each, ~5x cheaper than np.isin on one row
        bad = value != bound[0]
        for allowed in bound[1:]:
            bad &= value != allowed
    elif rule.kind in ("at_least", "at_most", "within_width"):
        if rule.kind == "within_width":
            bound = widths[bound] if widths else request[bound].shape[1]
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
    # The value rules run on the sequences without their all-zero trailing columns (0 keeps every
    # rule on a sequence), the width rules on the padded widths: a request padded to the fixed
    # widths (10,000 candidates) is checked at the cost of the ids it carries.
    widths = {name: request[name].shape[1] for name in SEQUENCE_FIELDS}
    used = {name: request[name][:, :_used_width(request[name])] for name in SEQUENCE_FIELDS}
    checked = {**request, **used}
    for rule in RULES:
        value = broken_value(rule, checked, limits, widths)
        if value is not None:
            raise RequestError(rule.field, f"{rule_message(rule, limits)}, got {int(value)}")
    return _drop_trailing_padding(request, used)


def _used_width(values: np.ndarray) -> int:
    """1 + the last column of [B, W] holding a non-zero id (0: all padding)."""
    if values.shape[0] == 1:  # one row: no [W] column mask
        last = np.flatnonzero(values[0])
        return int(last[-1]) + 1 if last.size else 0
    used = values.any(axis=0)[::-1]  # per column, last first
    return len(used) - int(used.argmax()) if used.size and used.any() else 0


def _drop_trailing_padding(request: dict[str, np.ndarray], used: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Padding beyond the longest row carries nothing; dropping it keeps positions inside the model's
    table. `used`: the sequences without their all-zero trailing columns."""
    trimmed = dict(request)
    for sequence, lengths in SEQUENCE_FIELDS.items():
        if lengths is None:
            trimmed[sequence] = used[sequence]
        else:  # the lengths say where a row ends (ids past it are not read, zero or not)
            trimmed[sequence] = request[sequence][:, :int(request[lengths].max(initial=0))]
    return trimmed


class StackBuffers:
    """Reused memory for pad_and_stack's sequences (one flat int64 buffer per field, grown on demand):
    the python-backend model stacks every execution's requests without allocating. The arrays it
    hands out are overwritten by the next pad_and_stack that uses the same buffers."""

    def __init__(self):
        self._flat: dict[str, np.ndarray] = {}

    def zeros(self, name: str, rows: int, width: int) -> np.ndarray:
        """A C-contiguous [rows, width] array of zeros in the field's buffer."""
        size = rows * width
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            flat = self._flat[name] = np.empty(max(size, 2 * (0 if flat is None else flat.size)), dtype=np.int64)
        out = flat[:size].reshape(rows, width)
        out.fill(0)
        return out


def pad_and_stack(requests: list[dict[str, np.ndarray]], buffers: StackBuffers | None = None) -> dict[str, np.ndarray]:
    """Concatenates requests along the batch, right-padding sequences with 0 to the longest.

    Sequences get at least one (padding) column: the exported graph rejects zero-width inputs. One
    request's arrays are passed through where they are already contiguous int64 with a column (no
    copy); `buffers` holds the stacked sequences in reused memory instead of new arrays."""
    rows = sum(len(r["task"]) for r in requests)
    batch = {}
    for name in FIELDS:
        parts = [r[name] for r in requests]
        if name not in SEQUENCE_FIELDS:
            batch[name] = (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.int64, copy=False)
            continue
        width = max(1, *(part.shape[1] for part in parts))
        if len(parts) == 1 and parts[0].shape[1] == width and parts[0].dtype == np.int64 and parts[0].flags.c_contiguous:
            batch[name] = parts[0]
            continue
        # One zero-filled array per field, filled row block by row block.
        out = buffers.zeros(name, rows, width) if buffers is not None else np.zeros((rows, width), dtype=np.int64)
        start = 0
        for part in parts:
            out[start:start + len(part), :part.shape[1]] = part
            start += len(part)
        batch[name] = out
    return batch
