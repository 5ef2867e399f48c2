"""The in-memory form of a dataset: users' chronological item sequences + item content. Item ids
are contiguous 1..num_items; 0 is padding."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line)."""


@dataclass
class InteractionData:
    name: str
    sequences: list[np.ndarray]  # per user: item ids (1-based), oldest first
    num_items: int
    item_attributes: list[list[int]]  # index = item id (row 0 unused): attribute ids, 1-based
    attribute_names: list[str]  # index = attribute id (0 = padding "")
    item_text: list[str]  # index = item id: title / content words ("" when unknown)
    user_keys: list[str]  # external user id per sequence
    item_keys: list[str] | None = None  # index = item id: external item id (ASIN, movieId); None when unknown

    def __post_init__(self) -> None:
        if len(self.item_attributes) != self.num_items + 1 or len(self.item_text) != self.num_items + 1:
            raise DatasetError(f"{self.name}: item tables must have num_items + 1 rows")
        if self.item_keys is not None and len(self.item_keys) != self.num_items + 1:
            raise DatasetError(f"{self.name}: item_keys must have num_items + 1 rows")

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def item_attribute_text(self, item: int) -> str:
        return " ".join(self.attribute_names[a] for a in self.item_attributes[item])

    def fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on (sizes + interaction hash)."""
        h = hashlib.sha256(f"{self.num_items}:{self.num_attributes}:{len(self.sequences)}".encode())
        for seq in self.sequences:
            h.update(np.asarray(seq, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]
