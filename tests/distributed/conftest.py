"""Session runs shared by the distributed tests (see _dist_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from _dist_helpers import MIXED_PLAN, torchrun


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted reference runs: 1 rank, and 2 ranks with a mixed TW/CW/TWCW plan."""
    base = tmp_path_factory.mktemp("dist")
    one, two = base / "one", base / "two"
    torchrun(1, one)
    torchrun(2, two, *MIXED_PLAN)
    return {"one": one, "two": two, "base": base}
