"""Tokenizers for search queries and item content words, shared by training and serving.

`WordTokenizer`: words are lowercase letter runs (the protocol's query construction rule), so a
query built from attribute names and the item's own attribute words land on the same vocabulary
rows. `WordPieceTokenizer`: the text encoder's own word pieces (all-MiniLM-L6-v2), needed when the
model runs that encoder on the query; ids are the encoder's vocabulary ids (0 = [PAD]).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from unirank.model.encoder_files import bundled_model_dir, import_transformers

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

    def words_of(self, ids: list[int]) -> list[str]:
        """The known words behind token ids (padding / OOV dropped)."""
        return [self.words[i - 2] for i in ids if 2 <= i < self.vocab_size]

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
        tokenizer = load_tokenizer(path)
        if not isinstance(tokenizer, cls):
            raise ValueError(f"{path} holds a {tokenizer.to_dict()['type']} tokenizer, not a word tokenizer")
        return tokenizer


class WordPieceTokenizer:
    """The bundled text encoder's WordPiece tokenizer (lowercasing, no special tokens: the model
    adds [CLS] / [SEP] itself). Serialised as the vocabulary's sha256: loading checks that the
    installed encoder package has the same vocabulary, so training and serving cannot drift."""

    def __init__(self, model_dir: str | Path | None = None):
        AutoTokenizer = import_transformers().AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        self.hf = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.vocab_sha256 = hashlib.sha256((self.model_dir / "vocab.txt").read_bytes()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, max_length: int | None = None, unique: bool = False) -> list[int]:
        ids = self.hf(text, add_special_tokens=False)["input_ids"] if text.strip() else []
        if unique:
            ids = list(dict.fromkeys(ids))
        return ids[:max_length] if max_length is not None else ids

    def words_of(self, ids: list[int]) -> list[str]:
        return split_words(self.hf.decode([i for i in ids if 0 < i < self.vocab_size], skip_special_tokens=True))

    def to_dict(self) -> dict:
        return {"type": "wordpiece", "vocab_sha256": self.vocab_sha256}

    @classmethod
    def from_dict(cls, data: dict) -> "WordPieceTokenizer":
        tokenizer = cls()
        if data.get("vocab_sha256") != tokenizer.vocab_sha256:
            raise ValueError(f"word-piece vocabulary mismatch: saved {data.get('vocab_sha256')!r}, the installed "
                             f"encoder package has {tokenizer.vocab_sha256!r} (install the version used in training)")
        return tokenizer

    save = WordTokenizer.save


Tokenizer = WordTokenizer | WordPieceTokenizer


def tokenizer_from_dict(data: dict) -> Tokenizer:
    kinds = {"word": WordTokenizer, "wordpiece": WordPieceTokenizer}
    if not isinstance(data, dict) or data.get("type") not in kinds:
        raise ValueError(f"unknown tokenizer: expected type in {sorted(kinds)}, got {data.get('type') if isinstance(data, dict) else data!r}")
    return kinds[data["type"]].from_dict(data)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Either kind, from a file written by `save`."""
    try:
        return tokenizer_from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, ValueError, RuntimeError) as err:
        raise ValueError(f"cannot load tokenizer from {path}: {err}") from err
