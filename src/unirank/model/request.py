"""The one request schema shared by data, model, ONNX export, server and client.

Field names are the ONNX input names and the client's argument names. `RULES` is the request
contract as plain data: the numpy checks (serving/request_arrays.py, used by the client and the
python-backend model) and the checks built into the ONNX graph (serving/graph_checks.py) both read
it. This file imports nothing outside the standard library: it is copied into model repositories.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Optional

PAD_ID = 0  # item id / token id 0 is padding everywhere


class Task(enum.IntEnum):
    """The item surfaces being served (their candidates are items); it is the task-token id inside the model."""

    SEARCH = 0
    SIMILAR = 1
    PREQUERY = 2


class QueryTask(enum.IntEnum):
    """Surfaces whose candidates are queries of the model's query catalogue, not items. Only a model
    trained with a query catalogue answers them (its export's limits say so: `num_queries`)."""

    SUGGEST = 3  # query suggestions before the user types: context = the user's history


TASK_NAMES = {Task.SEARCH: "search", Task.SIMILAR: "similar", Task.PREQUERY: "prequery",
              QueryTask.SUGGEST: "suggest"}
TASK_BY_NAME = {name: task for task, name in TASK_NAMES.items()}


class TaskIds(tuple):
    """The task ids a model answers; formats as "0 search, 1 similar, ..." in the contract's messages."""

    def __str__(self) -> str:
        return ", ".join(f"{t} {TASK_NAMES[t]}" for t in self)


def served_task_ids(num_queries: int) -> TaskIds:
    """Item tasks always; the query tasks when the model has a query catalogue."""
    return TaskIds(int(t) for t in (*Task, *(QueryTask if num_queries else ())))


@dataclass
class RankRequest:
    """A batch of requests as padded tensors (all int64).

    task            [B]     Task (or QueryTask) id per row.
    history         [B, L]  user's recent items, oldest first, left-aligned, 0-padded.
    history_lengths [B]     number of valid history items per row (may be 0).
    query           [B, Q]  query token ids (search only), 0-padded.
    query_lengths   [B]     number of valid query tokens (0 for other tasks).
    source_item     [B]     the item whose page is shown (similar-item only), else 0.
    candidates      [B, C]  optional ids to rank (query ids on suggest rows); None ranks the whole catalogue.
    exclude         [B, X]  item ids never to return (already bought, blocked, out of stock), 0-padded;
                            the model does not read them. None = none.
    exclude_lengths [B]     number of valid exclude ids per row (at most MAX_EXCLUDE).

    The history is what the model reads (its newest max_history items); `exclude` is what a service
    must not show. An item row never returns an item of its history (search, pre-query), its source
    item (similar-item) or its exclude list (model/scoring.py hidden_ids); suggest rows rank queries
    and filter nothing.
    """

    task: "torch.Tensor"  # noqa: F821 (torch is not imported here: see the module docstring)
    history: "torch.Tensor"  # noqa: F821
    history_lengths: "torch.Tensor"  # noqa: F821
    query: "torch.Tensor"  # noqa: F821
    query_lengths: "torch.Tensor"  # noqa: F821
    source_item: "torch.Tensor"  # noqa: F821
    candidates: Optional["torch.Tensor"] = None  # noqa: F821
    exclude: Optional["torch.Tensor"] = None  # noqa: F821
    exclude_lengths: Optional["torch.Tensor"] = None  # noqa: F821

    @property
    def batch_size(self) -> int:
        return int(self.task.shape[0])

    def to(self, device) -> "RankRequest":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return RankRequest(**{k: (v.to(device) if v is not None else None) for k, v in moved.items()})


INPUT_NAMES = [f.name for f in fields(RankRequest)]
ROW_FIELDS = ("task", "history_lengths", "query_lengths", "source_item", "exclude_lengths")
SEQUENCE_LENGTHS = {"history": "history_lengths", "query": "query_lengths", "candidates": None,
                    "exclude": "exclude_lengths"}
ID_FIELDS = ("history", "query", "source_item", "candidates", "exclude")
MAX_CANDIDATES = 10_000
MAX_EXCLUDE = 1_000  # exclude ids per row (a fixed limit of the schema, not of a model)
# Limits a rule may name (besides "task_ids", the served_task_ids of the model); num_items is not
# one: unknown ids are scored with the OOV embedding.
SEQUENCE_LIMITS = {"history": "max_history", "query": "max_query_len"}


@dataclass(frozen=True)
class Rule:
    """One check of the request contract, applied in `RULES` order; the first broken one is reported
    as "<field>: <message>" (numpy checks append the offending value).

    kind          field must satisfy                          bound
    batch         at least one row                            -
    one_of        every value in bound                        tuple of ints, or a limit name
    at_least      every value >= bound                        int
    at_most       every value <= bound                        int, or a limit name (SEQUENCE_LIMITS values)
    within_width  every value <= the width of sequence bound  sequence name
    width_at_most the padded width <= bound                   int
    set_for_task  value != 0 on rows whose task == bound      task id
    """

    kind: str
    field: str
    message: str
    bound: object = None


RULES = (
    Rule("batch", "task", "batch size 0 (send at least one row)"),
    Rule("one_of", "task", "unknown task id (expected {limit})", "task_ids"),
    *(rule for sequence, limit in SEQUENCE_LIMITS.items() for rule in (
        Rule("at_least", f"{sequence}_lengths", "negative length", 0),
        Rule("within_width", f"{sequence}_lengths", f"length > padded {sequence} width", sequence),
        Rule("at_most", f"{sequence}_lengths", f"{sequence} longer than the model limit {{limit}}", limit),
    )),
    Rule("width_at_most", "candidates", f"more candidates than the limit {MAX_CANDIDATES}", MAX_CANDIDATES),
    Rule("at_least", "exclude_lengths", "negative length", 0),
    Rule("within_width", "exclude_lengths", "length > padded exclude width", "exclude"),
    Rule("at_most", "exclude_lengths", f"more exclude ids than the limit {MAX_EXCLUDE}", MAX_EXCLUDE),
    *(Rule("at_least", name, "negative id", 0) for name in ID_FIELDS),
    Rule("set_for_task", "source_item", "similar-item rows need a source item", Task.SIMILAR),
)
