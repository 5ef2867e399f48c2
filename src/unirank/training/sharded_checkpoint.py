"""Resumable checkpoints of the training loop with torch.distributed.checkpoint (DCP), at every
world size: one process writes plain tensors, N ranks write their shards of a
DistributedModelParallel ranker (and replicated tensors once).

Layout of a checkpoint root (distributed.checkpoint_dir):

    LATEST                 name of the newest committed checkpoint (written atomically)
    step-00000120/         one committed checkpoint
        .metadata          DCP global metadata (rank 0, written last by DCP)
        __<rank>_0.distcp  each rank's shards (embedding shards, and its share of replicated tensors)
        rank<r>.pt         that rank's RNG state (dropout)
        trainer.json       loop state: epoch, step, data-order RNG, negatives RNG, history, plan
        config.yaml        the run's config
        COMMIT             written by rank 0 after every rank finished, just before the rename
    .tmp-step-00000130/    a checkpoint being written: never read, removed on the next start

Commit protocol: every rank writes into `.tmp-<name>`; barrier; rank 0 checks that every shard file
named in the DCP metadata exists, writes COMMIT, fsyncs, renames the directory to `<name>` and
rewrites LATEST (temp file + rename). A crash at any point leaves either the previous checkpoint as
LATEST or a `.tmp-*` directory without effect. Loading checks COMMIT and every shard file first and
names what is missing.

Resharding: the model and optimizer state are saved as ShardedTensors keyed by parameter name, so
`load_sharded` restores them into a model sharded for any world size / plan (DCP reads the
overlapping pieces). `consolidate` reads a checkpoint in ONE process without torch.distributed and
writes the project's single-file format (training/checkpoint.py) for evaluation and export.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from unirank.atomic_file import atomic_write
from unirank.config import load_config
from unirank.model.catalogue import Catalogue, CatalogueError
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.training.checkpoint import CheckpointError, save_checkpoint

COMMIT = "COMMIT"
CATALOGUE = "catalogue.pt"  # the model's catalogue (model/catalogue.py): consolidation builds the ranker from it
LATEST = "LATEST"
TMP_PREFIX = ".tmp-"
MODEL_PREFIX = "ranker."  # the DMP-wrapped training module holds the ranker as `.ranker`


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: this reads it allowing only the classes a DCP index is made of
    (its metadata records, dtypes, sizes, layouts, paths), so a crafted file cannot run code."""

    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
               ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
               ("torch", "Size"): torch.Size, ("pathlib", "PosixPath"): Path, ("pathlib", "PurePosixPath"): Path}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)  # the index's records (dataclasses, enums)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeReader(FileSystemReader):
    """A DCP reader whose metadata load runs no code (_MetadataUnpickler); the tensor files DCP reads
    with torch.load(weights_only=True) itself."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def remove_stale(root: Path) -> list[Path]:
    """Rank 0 at start: drop half-written `.tmp-*` directories left by a crashed run."""
    stale = sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def verify(path: Path) -> dict:
    """Raise CheckpointError unless `path` is a committed, complete checkpoint; returns trainer.json."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"sharded checkpoint not found: {path}")
    if path.name.startswith(TMP_PREFIX) or not (path / COMMIT).is_file():
        raise CheckpointError(f"{path}: not committed (no {COMMIT} marker): a run died while writing it")
    try:
        metadata = SafeReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(err).__name__}: {err})") from err
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"missing shard file {name}")
        elif f.stat().st_size < size:
            problems.append(f"truncated shard file {name} ({f.stat().st_size} < {size} bytes)")
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}")
    try:
        return json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: trainer.json unreadable: {err}") from err


def latest(root: str | Path) -> Path | None:
    """The checkpoint LATEST names (verified), or None when the root has no committed checkpoint."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    verify(path)
    return path


def save_catalogue(root: str | Path, catalogue: Catalogue) -> None:
    """Rank 0 at the start of a run: the run's catalogue, once, in the checkpoint root; every
    checkpoint then links it (save_sharded) instead of writing it again."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    catalogue.save(root / CATALOGUE)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def save_sharded(root: str | Path, step: int, state: dict, trainer_state: dict, rank_state: dict,
                 config_yaml: str, keep: int = 2, protect: tuple[str, ...] = ()) -> Path:
    """Collective: every rank calls it with its DCP `state` ({"model": ..., "optim": ..., ...}: plain,
    replicated or sharded tensors keyed by name). Returns the committed directory, which holds the
    run's catalogue too (linked from the root: save_catalogue)."""
    root = Path(root)
    name = checkpoint_name(step)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    atomic_write(tmp / f"rank{rank}.pt", lambda f: torch.save(rank_state, f))
    _barrier()  # every rank's files are on disk
    if rank == 0:
        _write_atomic(tmp / "config.yaml", config_yaml)
        _link(root / CATALOGUE, tmp / CATALOGUE)
        _write_atomic(tmp / "trainer.json", json.dumps({**trainer_state, "world_size": _world()}, indent=1))
        _write_atomic(tmp / COMMIT, json.dumps({"step": step, "world_size": _world()}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step saved twice (e.g. epoch end == periodic): replace
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(root / LATEST, name)
        _fsync_dir(root)
        _prune(root, keep, {name, *protect})
    _barrier()
    return final


def _prune(root: Path, keep: int, protect: set[str]) -> None:
    committed = sorted(p for p in root.glob("step-*") if (p / COMMIT).is_file())
    for p in committed[: max(0, len(committed) - keep)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def load_sharded(path: str | Path, state: dict) -> dict:
    """Collective: load a committed checkpoint INTO `state` (the same structure save_sharded was
    given, built for the current model, optimizer and plan: DCP reshards as needed); returns
    {"trainer": trainer.json, "rank_state": this rank's RNG state or None}."""
    path = Path(path)
    trainer = verify(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(str(path)))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load into this model / plan ({type(err).__name__}: {err})") from err
    return {"trainer": trainer, "rank_state": _rank_state(path / f"rank{_rank()}.pt")}


def _rank_state(path: Path) -> dict | None:
    """A rank's RNG state (plain tensors), loaded weights-only: a file that would run code is refused."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for a foreign pickle, RuntimeError / EOFError for a truncated one
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable rank state ({type(err).__name__}: {first})") from err


def read_full_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model part of a checkpoint as full (unsharded) tensors, in this process only."""
    path = Path(path)
    verify(path)
    metadata = SafeReader(str(path)).read_metadata()
    template = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            template[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    dcp.load({"model": template}, storage_reader=SafeReader(str(path)), no_dist=True)
    return template


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Sharded checkpoint -> the single-file format of training/checkpoint.py (no torch.distributed),
    from the checkpoint's own files (config, catalogue, weights): no dataset is read.

    Hashed-capacity rows beyond what the model's id space reaches (distributed.tables.*.rows) are
    dropped: the single-process model never looks them up."""
    path = Path(path)
    trainer = verify(path)
    config_yaml = (path / "config.yaml").read_text()
    cfg = load_config(str(path / "config.yaml"))
    try:
        catalogue = Catalogue.load(path / CATALOGUE)
    except CatalogueError as err:
        raise CheckpointError(str(err)) from err
    torch.manual_seed(cfg.train.seed)
    if "ranker_config" not in trainer:
        raise CheckpointError(f"{path}: trainer.json has no ranker_config (written by an older unirank)")
    ranker = UnifiedRanker(RankerConfig(**trainer["ranker_config"]), catalogue)
    full = read_full_model_state(path)
    expected = ranker.state_dict()
    state = {}
    for key, value in full.items():
        if not key.startswith(MODEL_PREFIX):
            raise CheckpointError(f"{path}: unexpected model key {key!r}")
        k = key[len(MODEL_PREFIX):]
        if k not in expected:
            raise CheckpointError(f"{path}: checkpoint key {k!r} is not in the model built from its config")
        want = expected[k].shape
        if value.shape != want:
            if value.dim() == 2 and value.shape[1] == want[1] and value.shape[0] >= want[0]:
                value = value[: want[0]].clone()
            else:
                raise CheckpointError(f"{path}: {k} has shape {tuple(value.shape)}, the model expects {tuple(want)}")
        state[k] = value
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    ranker.load_state_dict(state)
    metadata = {**catalogue.dataset, "dataset": catalogue.dataset.get("name"), "tasks": cfg.train.tasks,
                "epoch": trainer.get("best_epoch") or trainer.get("epoch"), "validation": trainer.get("validation"),
                "sharded_checkpoint": str(path), "step": trainer.get("step"),
                "trained_world_size": trainer.get("world_size")}
    metadata.pop("name", None)
    save_checkpoint(out, ranker, catalogue, config_yaml, metadata)
    return Path(out)
