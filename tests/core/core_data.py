"""Helpers for the core tests (a plain module, not conftest.py: tests/serving imports its own `conftest`
by name, so a second one would shadow it): the shared data location and hand-built tiny datasets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unirank.data.datasets import InteractionData

REPO = Path(__file__).resolve().parents[2]
# CI clones the repository with shared/ beside it: <clone>/../shared/data.
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} not available")
    return path


def hand_data(sequences: list[list[int]], item_attributes: list[list[int]], attribute_names: list[str],
              item_text: list[str] | None = None, user_keys: list[str] | None = None) -> InteractionData:
    """InteractionData from literal lists (item_attributes / item_text include row 0)."""
    num_items = len(item_attributes) - 1
    return InteractionData(
        name="hand", sequences=[np.array(s, dtype=np.int64) for s in sequences], num_items=num_items,
        item_attributes=item_attributes, attribute_names=attribute_names,
        item_text=item_text if item_text is not None else [""] * (num_items + 1),
        user_keys=user_keys if user_keys is not None else [f"user{u}" for u in range(len(sequences))])
