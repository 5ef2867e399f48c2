"""The in-memory form of a dataset (users' chronological item sequences + item content) and the
format dispatch. Item ids are contiguous 1..num_items; 0 is padding."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

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


def load_dataset(path: str, fmt: str = "auto", **synthetic_kwargs) -> InteractionData:
    """Load a dataset directory (Amazon S3-Rec layout or MovieLens csv/dat) or `synthetic`."""
    from unirank.data.datasets import amazon, movielens, synthetic

    if fmt == "synthetic" or (fmt == "auto" and path == "synthetic"):
        return synthetic.generate(**synthetic_kwargs)
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    if fmt == "auto":
        if (root / "datamaps.json").exists() or any(root.glob("*_item2attributes.json")):
            fmt = "amazon"
        elif any((root / f).exists() for f in ("ratings.csv", "ratings.dat")):
            fmt = "movielens"
        else:
            raise DatasetError(
                f"{root}: cannot tell the format (expected NAME_item2attributes.json for the Amazon layout, "
                "or ratings.csv / ratings.dat for MovieLens)"
            )
    loaders = {"amazon": amazon.load, "movielens": movielens.load}
    if fmt not in loaders:
        raise DatasetError(f"unknown dataset format {fmt!r}; expected one of auto, synthetic, {', '.join(loaders)}")
    return loaders[fmt](root)
