"""The catalogue a ranker is built from besides its config: what the items are (attribute and word
bags, frozen text vectors, semantic-ID codes, the lexical field's tokens, training counts), how text becomes token
ids (the tokenizer), the attribute vocabulary and the items' external ids (for items added at
export), and the suggest task's query catalogue.

It is saved with the weights (training/checkpoint.py, and beside every sharded checkpoint), so that
`UnifiedRanker(config, catalogue)` rebuilds the model from its own files: export, consolidation and
new-item export never reload the dataset. The file format is plain tensors, lists and strings,
read with `torch.load(weights_only=True)`: loading it cannot run code."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from unirank.atomic_file import atomic_write
from unirank.model.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "unirank-catalogue-v1"


class CatalogueError(ValueError):
    """A catalogue file or section is missing, unreadable or malformed; the message names it."""


@dataclass
class Catalogue:
    item_attributes: list[list[int]]  # index = item id (row 0: padding): attribute ids, 1-based
    item_words: list[list[int]]  # index = item id: content word (token) ids
    attribute_names: list[str] = field(default_factory=list)  # index = attribute id (0: padding "")
    tokenizer: dict | None = None  # Tokenizer.to_dict(): queries and content words -> token ids
    item_keys: list[str] | None = None  # index = item id: external id (ASIN, movieId); None when unknown
    item_text: torch.Tensor | None = None  # [num_items + 2, text_dim] frozen text-encoder vectors
    item_codes: torch.Tensor | None = None  # [num_items + 2, levels] semantic-ID codes
    lexical_rows: list[list[int]] | None = None  # ids 0..num_items + 1: token ids of the lexical field
    query_texts: list[str] = field(default_factory=list)  # suggest: query id = position + 1
    query_tokens: torch.Tensor | None = None  # [num_queries + 2, max_query_len] token ids per query id
    query_lengths: torch.Tensor | None = None  # [num_queries + 2]
    dataset: dict = field(default_factory=dict)  # name and fingerprint of the training data
    # [num_items + 2] int64: training interactions per id (fresh items, model.fresh_boost); None: unknown
    # (a catalogue written before the counts were kept: no item counts as fresh)
    item_counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows = len(self.item_attributes)
        if rows < 1 or len(self.item_words) != rows:
            raise CatalogueError(f"item_attributes and item_words need one row per item id (+ padding row 0), "
                                 f"got {rows} and {len(self.item_words)}")
        for name in ("item_text", "item_codes"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 2 or value.shape[0] != rows + 1):
                raise CatalogueError(f"{name} must be [num_items + 2, *], got {list(value.shape)} for "
                                     f"{rows - 1} items")
        if self.lexical_rows is not None and len(self.lexical_rows) != rows + 1:
            raise CatalogueError(f"lexical_rows needs {rows + 1} rows (ids 0..num_items + 1), got {len(self.lexical_rows)}")
        counts = self.item_counts
        if counts is not None and (not isinstance(counts, torch.Tensor) or counts.dim() != 1
                                   or counts.shape[0] != rows + 1 or bool((counts < 0).any())):
            got = list(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise CatalogueError(f"item_counts must be [num_items + 2] non-negative counts, got {got} for "
                                 f"{rows - 1} items")
        if (self.query_tokens is None) != (self.query_lengths is None):
            raise CatalogueError("query_tokens and query_lengths go together")

    @property
    def num_items(self) -> int:
        return len(self.item_attributes) - 1

    @property
    def query_token_ids(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.query_tokens is None else (self.query_tokens, self.query_lengths)

    def load_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise CatalogueError("the catalogue carries no tokenizer")
        return tokenizer_from_dict(self.tokenizer)

    def to_dict(self) -> dict:
        """Plain types only (ints, not numpy scalars: weights-only loading refuses those)."""
        out = asdict(self) | {"format": FORMAT}
        for name in ("item_attributes", "item_words", "lexical_rows"):
            if out[name] is not None:
                out[name] = [[int(v) for v in row] for row in out[name]]
        for name in ("item_text", "item_codes", "query_tokens", "query_lengths", "item_counts"):
            if out[name] is not None:
                out[name] = getattr(self, name).detach().cpu().clone()
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Catalogue":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CatalogueError(f"{where}: not a unirank catalogue (expected format {FORMAT})")
        names = {f.name for f in fields(cls)}
        missing = {"item_attributes", "item_words", "attribute_names", "tokenizer"} - set(data)
        if missing:
            raise CatalogueError(f"{where}: catalogue lacks {sorted(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as err:
            raise CatalogueError(f"{where}: {err}") from err

    def save(self, path: str | Path) -> None:
        atomic_write(path, lambda f: torch.save(self.to_dict(), f))

    @classmethod
    def load(cls, path: str | Path) -> "Catalogue":
        path = Path(path)
        if not path.is_file():
            raise CatalogueError(f"catalogue not found: {path}")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for truncated or foreign files
            first = (str(err).strip().splitlines() or [""])[0]
            raise CatalogueError(f"{path}: not a readable catalogue ({type(err).__name__}: {first})") from err
        return cls.from_dict(data, str(path))
