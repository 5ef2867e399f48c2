"""Single-file checkpoints: written atomically (temp file + rename, so a crash never leaves a
half-written file under the real name), self-contained (config, tokenizer, item features, the
query catalogue's texts), and
checked on load against the config the caller expects."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "unirank-checkpoint-v1"


class CheckpointError(ValueError):
    pass


@dataclass
class LoadedCheckpoint:
    ranker: UnifiedRanker
    tokenizer: Tokenizer
    config: str  # the run's full config, YAML
    metadata: dict  # dataset name/fingerprint, epoch, validation metrics
    optimizer_state: dict | None
    query_texts: list[str]  # the suggest task's query catalogue: id = position + 1 (empty: no suggest)


def save_checkpoint(path: str | Path, ranker: UnifiedRanker, tokenizer: Tokenizer,
                    item_attributes: list[list[int]], item_words: list[list[int]], config_yaml: str,
                    metadata: dict, optimizer: torch.optim.Optimizer | None = None,
                    state_dict: dict | None = None, query_texts: list[str] = ()) -> None:
    """`state_dict`: the ranker's weights when they live elsewhere (a data-parallel DMP replica);
    `query_texts`: the query catalogue (its token ids are buffers of the ranker)."""
    if len(query_texts) != ranker.config.num_queries:
        raise ValueError(f"{len(query_texts)} query texts for a model with {ranker.config.num_queries} queries")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = {
        "format": FORMAT,
        "ranker_config": ranker.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in (state_dict or ranker.state_dict()).items()},
        "tokenizer": tokenizer.to_dict(),
        # plain ints: weights_only loading refuses numpy scalars
        "item_features": {"attributes": [[int(a) for a in row] for row in item_attributes],
                          "words": [[int(w) for w in row] for row in item_words]},
        "query_texts": [str(t) for t in query_texts],
        "config": config_yaml,
        "metadata": metadata,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }
    atomic_write(path, lambda f: torch.save(bundle, f))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename over `path`: a reader (or a crash)
    sees the old file or the new one, never half of one. Every file a checkpoint consists of is
    written through here."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tokenizer(path: Path, data: dict) -> Tokenizer:
    try:
        return tokenizer_from_dict(data)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def read_bundle(path: str | Path) -> dict:
    """The checkpoint file's contents, refused (naming the file) if it is missing, unreadable or not
    a unirank checkpoint: cheap enough to call before preparing any data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types (and multi-line messages) for truncated / foreign files
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unirank checkpoint (expected format {FORMAT})")
    return bundle


def load_checkpoint(path: str | Path, expect: RankerConfig | None = None) -> LoadedCheckpoint:
    """Load a checkpoint; with `expect`, refuse one whose model config differs (naming the keys)."""
    path = Path(path)
    bundle = read_bundle(path)
    # implementation switches are not part of the weights: a loaded model picks them for its device
    switches = {"attention_impl": "auto", "embedding_bag_impl": "auto"}
    try:
        cfg = RankerConfig(**{**bundle["ranker_config"], **switches})
    except TypeError as err:
        raise CheckpointError(f"{path}: model config does not match this version of unirank: {err}") from err
    if expect is not None:
        diff = {k: (v, getattr(expect, k)) for k, v in cfg.to_dict().items()
                if k not in switches and getattr(expect, k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{path}: checkpoint was trained with another model config ({detail})")
    feats = bundle["item_features"]
    ranker = UnifiedRanker(cfg, feats["attributes"], feats["words"])
    try:
        ranker.load_state_dict(bundle["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model config: {err}") from err
    return LoadedCheckpoint(ranker=ranker, tokenizer=_tokenizer(path, bundle["tokenizer"]),
                            config=bundle["config"], metadata=bundle["metadata"],
                            optimizer_state=bundle.get("optimizer"), query_texts=list(bundle.get("query_texts", [])))
