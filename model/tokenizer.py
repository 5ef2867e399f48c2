"""Word tokenizer for search queries and item content words, shared by training and serving.

Words are lowercase letter runs (the protocol's query construction rule), so a query built from
attribute names and the item's own attribute words land on the same vocabulary rows.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

WORD_RE = re.compile(r"[a-z]+")
PAD_TOKEN_ID = 0
OOV_TOKEN_ID = 1


def split_words(text: str) -> list[str]:
    """Lowercase, split on non-letters."""
    return WORD_RE.findall(text.lower())


class WordTokenizer:
    """Maps words to ids: 0 is padding, 1 is out-of-vocabulary, the rest by descending frequency."""

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.word_to_id = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def fit(cls, texts: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        counts = Counter(w for text in texts for w in split_words(text))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2

    def encode(self, text: str, max_length: int | None = None, unique: bool = False) -> list[int]:
        words = split_words(text)
        if unique:
            words = list(dict.fromkeys(words))
        ids = [self.word_to_id.get(w, OOV_TOKEN_ID) for w in words]
        return ids[:max_length] if max_length is not None else ids

    def to_dict(self) -> dict:
        return {"type": "word", "words": self.words}

    @classmethod
    def from_dict(cls, data: dict) -> "WordTokenizer":
        if data.get("type") != "word" or not isinstance(data.get("words"), list):
            raise ValueError("not a unirank word tokenizer: expected {'type': 'word', 'words': [...]}")
        return cls(data["words"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"cannot load tokenizer from {path}: {err}") from err
