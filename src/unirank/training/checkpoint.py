"""Single-file checkpoints: written atomically (temp file + rename, so a crash never leaves a
half-written file under the real name), self-contained (the weights, the model's catalogue
(model/catalogue.py), the run config), loaded weights-only (a file cannot run code), and checked on
load against the config the caller expects."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from unirank.atomic_file import atomic_write
from unirank.config import INFERENCE_SETTINGS
from unirank.model.catalogue import Catalogue, CatalogueError
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "unirank-checkpoint-v2"
FORMAT_V1 = "unirank-checkpoint-v1"  # item bags, tokenizer and query texts at the top level, no catalogue


class CheckpointError(ValueError):
    pass


@dataclass
class LoadedCheckpoint:
    ranker: UnifiedRanker
    catalogue: Catalogue  # what the ranker was built from: items, tokenizer, query catalogue
    tokenizer: Tokenizer
    config: str  # the run's full config, YAML
    metadata: dict  # dataset name/fingerprint, epoch, validation metrics
    optimizer_state: dict | None

    @property
    def query_texts(self) -> list[str]:
        """The suggest task's query catalogue: id = position + 1 (empty: no suggest)."""
        return self.catalogue.query_texts


def save_checkpoint(path: str | Path, ranker: UnifiedRanker, catalogue: Catalogue, config_yaml: str,
                    metadata: dict, optimizer: torch.optim.Optimizer | None = None,
                    state_dict: dict | None = None) -> None:
    """`state_dict`: the ranker's weights when they live elsewhere (a data-parallel DMP replica)."""
    if len(catalogue.query_texts) != ranker.config.num_queries:
        raise ValueError(f"{len(catalogue.query_texts)} query texts for a model with {ranker.config.num_queries} queries")
    if catalogue.tokenizer is None:
        raise ValueError("a checkpoint's catalogue needs the tokenizer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = {
        "format": FORMAT,
        "ranker_config": ranker.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in (state_dict or ranker.state_dict()).items()},
        "catalogue": catalogue.to_dict(),
        "config": config_yaml,
        "metadata": metadata,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }
    atomic_write(path, lambda f: torch.save(bundle, f))


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
    if isinstance(bundle, dict) and bundle.get("format") == FORMAT_V1:
        return _from_v1(bundle)
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unirank checkpoint (expected format {FORMAT})")
    return bundle


def _from_v1(bundle: dict) -> dict:
    """A v1 file in the v2 layout: its catalogue lacks the attribute vocabulary and the text vectors
    outside the weights, so such a model exports and evaluates but takes no new items."""
    state, feats = bundle["state_dict"], bundle["item_features"]
    catalogue = Catalogue(feats["attributes"], feats["words"], tokenizer=bundle["tokenizer"],
                          item_text=state.get("item_tower.item_text"), item_codes=state.get("item_tower.item_codes"),
                          query_texts=list(bundle.get("query_texts", [])), query_tokens=state.get("query_tokens"),
                          query_lengths=state.get("query_token_lengths"))
    return {**bundle, "format": FORMAT, "catalogue": catalogue.to_dict()}


def load_checkpoint(path: str | Path, expect: RankerConfig | None = None) -> LoadedCheckpoint:
    """Load a checkpoint; with `expect`, refuse one whose model config differs (naming the keys), and
    take its inference-only settings (model.fresh_boost: no weight depends on them)."""
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
                if k not in switches and k not in INFERENCE_SETTINGS and getattr(expect, k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{path}: checkpoint was trained with another model config ({detail})")
        cfg = replace(cfg, **{k: getattr(expect, k) for k in INFERENCE_SETTINGS})  # the caller's, not the run's
    try:
        catalogue = Catalogue.from_dict(bundle.get("catalogue"), f"{path} (catalogue)")
        ranker = UnifiedRanker(cfg, catalogue)
    except (CatalogueError, ValueError) as err:
        raise CheckpointError(str(err)) from err
    try:
        ranker.load_state_dict(bundle["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the model config: {err}") from err
    return LoadedCheckpoint(ranker=ranker, catalogue=catalogue, tokenizer=_tokenizer(path, catalogue.tokenizer),
                            config=bundle["config"], metadata=bundle["metadata"],
                            optimizer_state=bundle.get("optimizer"))
