"""MovieLens releases: csv (ml-latest(-small), ml-20m, ml-25m) and `::`-separated .dat (ml-1m, ml-10m).

Every rating is an interaction (implicit feedback); a user's sequence is ordered by timestamp,
stable on ties (file order). Genres are the item attributes, the title is the item text.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from unirank.data.datasets.catalog import DatasetError, InteractionData


def _rows(path: Path, fields: int):
    """Yield (lineno, fields) from a csv with header, or a headerless `::` .dat file."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader, None)
            for lineno, row in enumerate(reader, 2):
                if row:
                    yield lineno, row[:fields] if len(row) >= fields else row
    else:
        with path.open(encoding="latin-1") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line.rstrip("\n").split("::")[:fields]


def _pick(root: Path, stem: str) -> Path:
    for suffix in (".csv", ".dat"):
        if (root / f"{stem}{suffix}").exists():
            return root / f"{stem}{suffix}"
    raise DatasetError(f"missing dataset file: {root / stem}.csv (or .dat)")


def load(root: Path) -> InteractionData:
    ratings_path, movies_path = _pick(root, "ratings"), _pick(root, "movies")
    movie_title: dict[str, str] = {}
    movie_genres: dict[str, list[str]] = {}
    for lineno, row in _rows(movies_path, 3):
        if len(row) < 3:
            raise DatasetError(f"{movies_path}:{lineno}: expected movieId, title, genres")
        movie_title[row[0]] = row[1]
        movie_genres[row[0]] = [g for g in row[2].split("|") if g and g != "(no genres listed)"]

    events: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for lineno, row in _rows(ratings_path, 4):
        if len(row) < 4:
            raise DatasetError(f"{ratings_path}:{lineno}: expected userId, movieId, rating, timestamp")
        try:
            ts = int(float(row[3]))
        except ValueError as err:
            raise DatasetError(f"{ratings_path}:{lineno}: bad timestamp {row[3]!r}") from err
        if row[1] not in movie_title:
            raise DatasetError(f"{ratings_path}:{lineno}: movieId {row[1]} not in {movies_path.name}")
        events[row[0]].append((ts, lineno, row[1]))
    if not events:
        raise DatasetError(f"{ratings_path}: no ratings")

    movie_ids = sorted({m for evs in events.values() for _, _, m in evs}, key=lambda m: int(m) if m.isdigit() else m)
    item_of = {m: i + 1 for i, m in enumerate(movie_ids)}
    genres = sorted({g for m in movie_ids for g in movie_genres[m]})
    attr_of = {g: i + 1 for i, g in enumerate(genres)}

    users = sorted(events, key=lambda u: int(u) if u.isdigit() else u)
    seqs = [np.array([item_of[m] for _, _, m in sorted(events[u])], dtype=np.int64) for u in users]
    item_attributes = [[]] + [[attr_of[g] for g in movie_genres[m]] for m in movie_ids]
    item_text = [""] + [movie_title[m] for m in movie_ids]
    return InteractionData(
        name=root.name, sequences=seqs, num_items=len(movie_ids), item_attributes=item_attributes,
        attribute_names=[""] + genres, item_text=item_text, user_keys=users, item_keys=[""] + movie_ids,
    )
