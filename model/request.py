"""The one request schema shared by data, model, ONNX export, server and client.

Field names are the ONNX input names and the client's argument names.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Optional

import torch

PAD_ID = 0  # item id / token id 0 is padding everywhere


class Task(enum.IntEnum):
    """The product surface being served; it is the task-token id inside the model."""

    SEARCH = 0
    SIMILAR = 1
    PREQUERY = 2


TASK_NAMES = {Task.SEARCH: "search", Task.SIMILAR: "similar", Task.PREQUERY: "prequery"}


@dataclass
class RankRequest:
    """A batch of requests as padded tensors (all int64).

    task            [B]     Task id per row.
    history         [B, L]  user's recent items, oldest first, left-aligned, 0-padded.
    history_lengths [B]     number of valid history items per row (may be 0).
    query           [B, Q]  query token ids (search only), 0-padded.
    query_lengths   [B]     number of valid query tokens (0 for other tasks).
    source_item     [B]     the item whose page is shown (similar-item only), else 0.
    candidates      [B, C]  optional item ids to rank; None ranks the whole catalogue.
    """

    task: torch.Tensor
    history: torch.Tensor
    history_lengths: torch.Tensor
    query: torch.Tensor
    query_lengths: torch.Tensor
    source_item: torch.Tensor
    candidates: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.task.shape[0])

    def to(self, device: torch.device | str) -> "RankRequest":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return RankRequest(**{k: (v.to(device) if v is not None else None) for k, v in moved.items()})


INPUT_NAMES = [f.name for f in fields(RankRequest)]
