"""New items without retraining: item metadata (external id, title, attribute names) becomes rows
of the exported item table through the trained item tower's content path alone (no id row, as id
dropout trains it), appended after the trained catalogue; the OOV row stays last.

Everything comes from the checkpoint (its catalogue, model/catalogue.py): no dataset is read.
Per new item: attribute ids from its names through the training catalogue's vocabulary (unknown
names are counted and reported, not fatal), content words (title + names) through the model's
tokenizer, the frozen text encoder's vector of "title. names" (models with text features) and, for
models with semantic IDs, the K-means codes of the trained item whose text vector is nearest (the
codebook itself is not kept in a checkpoint) and collision code 0, the one the first item of every
code tuple has (so its row is trained; leaving the level out moves new items away from every
trained item: docs/RESULTS.md, "Cold items through the server"). The export gains new_items.json:
served item id <-> external id, so a client can name what it is given.

Metadata files: JSON lines (`{"id": "B00X", "title": "...", "attributes": ["Brand", "Category"]}`)
or CSV with a header `id,title,attributes` (attribute names separated by `|`). A row without an
id or a title, an id given twice, or an id of the trained catalogue is an error naming the line.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from unirank.model.catalogue import Catalogue
from unirank.model.scoring import AddedItems
from unirank.model.semantic_ids import UNSEEN_COLLISION_CODE
from unirank.model.text_encoder import TextEncoder, format_item_text
from unirank.model.tokenizer import OOV_TOKEN_ID

log = logging.getLogger(__name__)

FIELDS = ("id", "title", "attributes")


class NewItemsError(ValueError):
    """Bad new-item metadata; the message names the file and line."""


@dataclass
class NewItem:
    line: int
    key: str  # external id (ASIN, movieId)
    title: str
    attributes: list[str]


@dataclass
class NewItemsReport:
    trained_items: int  # served ids 1..trained_items are the trained catalogue
    items: list[dict]  # {"item_id", "external_id", "title"} per new item, in file order
    unknown_attributes: dict[str, int] = field(default_factory=dict)  # name -> rows that named it

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))


def _attributes(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [a.strip() for a in value.split("|") if a.strip()]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise NewItemsError(f"{where}: attributes must be a list of names (or one string, names separated by '|')")
    return [a.strip() for a in value if a.strip()]


def _text(value, where: str, name: str) -> str:
    """A scalar field as stripped text: 0 is the id "0", not a missing one; a list or an object is an
    error, never its Python repr."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise NewItemsError(f"{where}: {name} must be a string or a number, got {type(value).__name__}")
    return str(value).strip()


def _lines(path: Path) -> list[str]:
    """The file's lines as text; unreadable or non-UTF-8 bytes are an error naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise NewItemsError(f"{path}: cannot read the new-item metadata ({err.strerror or err})") from err
    lines = []
    for lineno, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise NewItemsError(f"{path}:{lineno}: not UTF-8 text (byte {err.start + 1} of the line)") from err
    return lines


def _rows(path: Path):
    """(line number, {field: value}) per non-empty row."""
    lines = _lines(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(lines)
        if reader.fieldnames is None:
            return
        missing = [n for n in ("id", "title") if n not in reader.fieldnames]
        if missing:
            raise NewItemsError(f"{path}:1: the CSV header needs the columns {list(FIELDS)}, missing {missing}")
        for row in reader:
            yield reader.line_num, row
        return
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise NewItemsError(f"{path}:{lineno}: not a JSON object ({err.msg})") from err
        if not isinstance(row, dict):
            raise NewItemsError(f"{path}:{lineno}: not a JSON object")
        yield lineno, row


def read_new_items(path: str | Path, catalogue_keys: set[str] | None = None) -> list[NewItem]:
    """The new items of a JSONL or CSV file, checked: every row has an id and a title, no id twice,
    none of `catalogue_keys` (the trained catalogue's external ids)."""
    path = Path(path)
    if not path.is_file():
        raise NewItemsError(f"new-item metadata not found: {path}")
    items, first_line = [], {}
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        key, title = _text(row.get("id"), where, "id"), _text(row.get("title"), where, "title")
        if not key:
            raise NewItemsError(f"{where}: missing id")
        if not title:
            raise NewItemsError(f"{where}: item {key!r} has no title")
        if key in first_line:
            raise NewItemsError(f"{where}: id {key!r} given twice (first on line {first_line[key]})")
        if catalogue_keys and key in catalogue_keys:
            raise NewItemsError(f"{where}: id {key!r} is already in the trained catalogue")
        first_line[key] = lineno
        items.append(NewItem(lineno, key, title, _attributes(row.get("attributes"), where)))
    if not items:
        raise NewItemsError(f"{path}: no items (empty file)")
    return items


def _normalize(name: str) -> str:
    return " ".join(name.split()).casefold()


def attribute_ids(items: list[NewItem], attribute_names: list[str]) -> tuple[list[list[int]], Counter]:
    """Attribute ids per item (exact name, else case- and space-insensitive) and the unknown names."""
    exact = {name: i for i, name in enumerate(attribute_names) if i and name}
    loose = {}
    for name, i in exact.items():
        loose.setdefault(_normalize(name), i)
    ids, unknown = [], Counter()
    for item in items:
        row = []
        for name in item.attributes:
            found = exact.get(name, loose.get(_normalize(name)))
            if found is None:
                unknown[name] += 1
            elif found not in row:
                row.append(found)
        ids.append(row)
    return ids, unknown


def _nearest_codes(tower, catalogue_text: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[M, levels] semantic-ID codes: the K-means levels of the trained item with the nearest text
    vector (cosine), collision code 0 (the last level: the code of every tuple's first item)."""
    catalogue = torch.nn.functional.normalize(catalogue_text[1: tower.num_items + 1].float(), dim=1)
    nearest = (torch.nn.functional.normalize(text.float().to(catalogue.device), dim=1) @ catalogue.T).argmax(1) + 1
    codes = tower.item_codes[nearest.to(tower.item_codes.device)].clone()
    codes[:, -1] = UNSEEN_COLLISION_CODE
    return codes


def encode_new_items(items: list[NewItem]) -> torch.Tensor:
    """[M, text_dim] the text-encoder vectors of the new items' content, as the catalogue's were made."""
    return torch.from_numpy(TextEncoder().encode([format_item_text(it.title, it.attributes) for it in items]))


def new_item_vectors(ranker, catalogue: Catalogue, items: list[NewItem],
                     text: torch.Tensor | None = None) -> tuple[torch.Tensor, Counter]:
    """[M, d] content-path vectors of `items` from the trained `ranker` (UnifiedRanker with its full
    item tower), and the attribute names the catalogue's vocabulary does not know. `text`: the items'
    text vectors (encode_new_items), when the caller has them already."""
    tower, tokenizer = ranker.item_tower, catalogue.load_tokenizer()
    attrs, unknown = attribute_ids(items, catalogue.attribute_names)
    words = [[w for w in tokenizer.encode(f"{it.title} {' '.join(it.attributes)}", unique=True) if w != OOV_TOKEN_ID]
             for it in items]
    codes = None
    needs_text = hasattr(tower, "text_proj") or bool(tower.semantic_id_sizes)
    if needs_text and text is None:
        text = encode_new_items(items)
    if tower.semantic_id_sizes:
        if catalogue.item_text is None:
            raise NewItemsError("the checkpoint's catalogue has no item text vectors: the new items' semantic-ID "
                                "codes cannot be found")
        codes = _nearest_codes(tower, catalogue.item_text, text)
    with torch.no_grad():
        vectors = tower.eval().content_vectors(attrs, words, text if hasattr(tower, "text_proj") else None, codes)
    return vectors, unknown


def extend_catalogue(plain, vectors: torch.Tensor, added: AddedItems) -> None:
    """Append item-table rows to an exported (plain) ranker: ids num_items + 1 .. num_items + M; row
    0 stays padding and the OOV row moves to the new last id + 1. Every score term extends itself
    from `added` (model/scoring.py)."""
    for term in plain.terms.values():
        term.extend(added)
    tower = plain.item_tower
    table = tower.table
    n = int(tower.num_items)
    tower.table = torch.cat([table[: n + 1], vectors.to(table.dtype), table[n + 1:]])
    tower.num_items = plain.num_items = n + len(vectors)
    plain.config = replace(plain.config, num_items=plain.num_items)


def add_new_items(loaded, plain, metadata_path: str | Path) -> NewItemsReport:
    """Read and check the metadata, then append the new items' content-path vectors to `plain` (the
    export form of `loaded.ranker`). Raises NewItemsError before changing anything."""
    catalogue = loaded.catalogue
    if not catalogue.attribute_names:
        raise NewItemsError("the checkpoint's catalogue has no attribute vocabulary (a checkpoint of an older "
                            "unirank): retrain to export new items")
    keys = set(catalogue.item_keys[1:]) if catalogue.item_keys is not None else set()
    if catalogue.item_keys is None:
        log.warning("%s carries no external item ids: the new items' ids cannot be checked against the "
                    "trained catalogue", catalogue.dataset.get("name", "the training data"))
    items = read_new_items(metadata_path, keys)
    text = encode_new_items(items) if any(term.needs_text for term in plain.terms.values()) else None
    vectors, unknown = new_item_vectors(loaded.ranker, catalogue, items, text=text)
    trained = int(plain.num_items)
    added = AddedItems([it.title for it in items], [it.attributes for it in items], loaded.tokenizer, text,
                       catalogue.item_text)
    extend_catalogue(plain, vectors, added)
    return NewItemsReport(trained, [{"item_id": trained + 1 + i, "external_id": it.key, "title": it.title}
                                    for i, it in enumerate(items)], dict(unknown))

