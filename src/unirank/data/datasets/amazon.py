"""Amazon review data in the S3-Rec/P5 layout: NAME.txt, NAME_item2attributes.json, and optionally
datamaps.json (attribute names, ASINs) and item_text.txt (titles, keyed by ASIN). Any category
(Beauty, Sports, Toys) loads with the same code. Without datamaps.json each attribute id names
itself and item text is not read (it is keyed by ASIN)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unirank.data.datasets.catalog import DatasetError, InteractionData


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise DatasetError(f"missing dataset file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from err


def _find_sequences_file(root: Path) -> Path:
    candidates = [p for p in root.glob("*.txt") if p.name != "item_text.txt"]
    named = [p for p in candidates if (root / f"{p.stem}_item2attributes.json").exists()]
    if len(named) != 1:
        raise DatasetError(
            f"{root}: expected exactly one NAME.txt with a matching NAME_item2attributes.json, "
            f"found {[p.name for p in named] or 'none'}"
        )
    return named[0]


def _read_sequences(path: Path) -> tuple[list[str], list[np.ndarray]]:
    users, seqs = [], []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n") and line.strip():
                raise DatasetError(f"{path}:{lineno}: the last line has no line end: the file is cut mid-line")
            parts = line.split()
            if not parts:
                continue
            try:
                items = np.array([int(x) for x in parts[1:]], dtype=np.int64)
            except ValueError as err:
                raise DatasetError(f"{path}:{lineno}: item ids must be integers ({err})") from err
            if len(items) == 0 or items.min() < 1:
                raise DatasetError(f"{path}:{lineno}: a user line needs >= 1 item id, all >= 1")
            users.append(parts[0])
            seqs.append(items)
    if not seqs:
        raise DatasetError(f"{path}: no user sequences")
    return users, seqs


def _read_maps(path: Path) -> dict:
    """datamaps.json's id2attribute and item2id; when the file is absent, no names (None: each
    attribute id names itself) and no ASINs."""
    if not path.exists():
        return {"id2attribute": None, "item2id": {}}
    maps = _read_json(path)
    for key in ("id2attribute", "item2id"):
        if key not in maps:
            raise DatasetError(f"{path}: missing key {key!r}")
    return maps


def load(root: Path) -> InteractionData:
    seq_path = _find_sequences_file(root)
    users, seqs = _read_sequences(seq_path)
    item2attrs = _read_json(root / f"{seq_path.stem}_item2attributes.json")
    maps = _read_maps(root / "datamaps.json")
    num_items = int(max(int(s.max()) for s in seqs))
    num_items = max(num_items, max((int(k) for k in maps["item2id"].values()), default=0))

    id2attr = maps["id2attribute"]
    if id2attr is None:
        id2attr = {str(a): str(a) for attrs in item2attrs.values() for a in attrs}
    num_attr = max((int(k) for k in id2attr), default=0)
    attribute_names = [""] * (num_attr + 1)
    for k, name in id2attr.items():
        attribute_names[int(k)] = str(name)
    item_attributes: list[list[int]] = [[] for _ in range(num_items + 1)]
    for k, attrs in item2attrs.items():
        item = int(k)
        if not 1 <= item <= num_items:
            raise DatasetError(f"{seq_path.stem}_item2attributes.json: item id {k} outside 1..{num_items}")
        bad = [a for a in attrs if not 1 <= int(a) <= num_attr]
        if bad:
            raise DatasetError(f"{seq_path.stem}_item2attributes.json: item {k} has unknown attribute ids {bad}")
        item_attributes[item] = [int(a) for a in attrs]

    item_text = [""] * (num_items + 1)
    text_path = root / "item_text.txt"
    if text_path.exists() and maps["item2id"]:  # optional: content features degrade gracefully without it
        item2id = maps["item2id"]
        with text_path.open() as f:
            for lineno, line in enumerate(f, 1):
                asin, _, text = line.rstrip("\n").partition(" ")
                if not asin:
                    continue
                if asin not in item2id:
                    raise DatasetError(f"{text_path}:{lineno}: ASIN {asin!r} not in datamaps.json item2id")
                item_text[int(item2id[asin])] = text.strip()
    item_keys = None
    if maps["item2id"]:
        item_keys = [""] * (num_items + 1)
        for asin, item in maps["item2id"].items():
            item_keys[int(item)] = asin
    return InteractionData(
        name=seq_path.stem, sequences=seqs, num_items=num_items, item_attributes=item_attributes,
        attribute_names=attribute_names, item_text=item_text, user_keys=users, item_keys=item_keys,
    )
