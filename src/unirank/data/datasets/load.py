"""The format dispatch: a dataset directory (Amazon S3-Rec layout, MovieLens csv/dat) or `synthetic`
to `InteractionData`."""
from __future__ import annotations

from pathlib import Path

from unirank.data.datasets import amazon, movielens, synthetic
from unirank.data.datasets.catalog import DatasetError, InteractionData


def load_dataset(path: str, fmt: str = "auto", **synthetic_kwargs) -> InteractionData:
    """Load a dataset directory (Amazon S3-Rec layout or MovieLens csv/dat) or `synthetic`."""
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
