"""`unirank export`: a checkpoint -> the served files in one directory, replaced whole or not at all:
the exact graph (serving/onnx_graph.py) with the tokenizer and metadata, the items added without
retraining (serving/new_items.py), the two-stage files (serving/context_export.py), and the parity
of ONNX Runtime against PyTorch."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from unirank.serving.context_export import export_two_stage, remove_two_stage
from unirank.serving.metadata import METADATA_FILE, MODEL_FILE, NEW_ITEMS_FILE, ExportMetadata
from unirank.serving.new_items import add_new_items
from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
from unirank.serving.synthetic_requests import random_batches
from unirank.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    out_dir: Path
    metadata: ExportMetadata
    max_abs_diff: float | None  # ONNX Runtime vs PyTorch parity, None when skipped
    parity_requests: int
    seconds: float
    new_items: object = None  # new_items.NewItemsReport when items were added


@contextmanager
def staged_directory(out_dir: str | Path):
    """Yields a fresh temp directory beside `out_dir`; on success it becomes `out_dir` by a rename (a
    previous export there is replaced whole), on any error it is removed: a failed export writes
    nothing. Refuses an existing `out_dir` that is not an export (no export.json), so that nothing
    else is ever replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).exists():
        raise ValueError(f"{out_dir} exists and is not an export (no {METADATA_FILE}): choose a new directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staged
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staged, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def export_model(checkpoint_path: str | Path, out_dir: str | Path, top_k: int = 100,
                 parity_requests: int = 256, parity_tolerance: float = 1e-4, seed: int = 0,
                 index=None, new_items: str | Path | None = None,
                 inference_settings: dict | None = None) -> ExportReport:
    """Checkpoint -> out_dir/{model.onnx, tokenizer.json, export.json}, then a parity check of ONNX
    Runtime against PyTorch on `parity_requests` random requests of every task (0 skips it).
    Raises AssertionError when the max abs score difference exceeds `parity_tolerance`.
    `index` (item_index.IndexOptions): also the two-stage files (context.onnx + the item index).
    `new_items` (a JSONL / CSV metadata file): items the model never saw join the served catalogue
    through the content path (serving/new_items.py, from the checkpoint's catalogue), listed in
    out_dir/new_items.json; the metadata is checked before anything is written.
    `inference_settings` (e.g. {"fresh_boost": 2.0}) replace the checkpoint's inference-only model
    settings (config.INFERENCE_SETTINGS) without retraining."""
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint_path)
    if inference_settings:
        if loaded.catalogue.item_counts is None:
            log.warning("%s: the catalogue carries no training counts (an older checkpoint): only items added at "
                        "export count as fresh", checkpoint_path)
        loaded.ranker.set_inference_settings(loaded.catalogue.item_counts, **inference_settings)
    beside = [name for name, term in loaded.ranker.terms.items() if not term.two_stage]
    if index is not None and beside:
        raise ValueError("two-stage serving (--index) retrieves by the context vector alone, and this model's "
                         f"scores add terms beside it ({', '.join(beside)}): export it without --index")
    if index is not None and loaded.query_texts:
        raise ValueError("two-stage serving (--index) ranks items only: export a model with a query catalogue "
                         "(suggest) as the exact graph")
    plain = loaded.ranker.to_plain().eval()
    added = None
    if new_items is not None:
        added = add_new_items(loaded, plain, new_items)
    metadata = export_onnx(plain, out_dir, top_k=top_k, tokenizer=loaded.tokenizer, query_texts=loaded.query_texts)
    (Path(out_dir) / NEW_ITEMS_FILE).unlink(missing_ok=True)
    if added is not None:
        added.save(Path(out_dir) / NEW_ITEMS_FILE)
    remove_two_stage(out_dir)  # a previous export's index must not be served with this model
    if index is not None:
        export_two_stage(plain, out_dir, index)
    diff = None
    if parity_requests:
        batches = random_batches(metadata, vocab_size=loaded.tokenizer.vocab_size, requests=parity_requests, seed=seed)
        diff = parity_max_abs_diff(TopKRanker(plain, top_k).eval(), onnx_session(Path(out_dir) / MODEL_FILE), batches)
        if diff > parity_tolerance:
            raise AssertionError(f"ONNX parity failed: max abs score diff {diff:.3g} > {parity_tolerance:g}")
        log.info("ONNX parity over %d requests: max abs diff %.3g", parity_requests, diff)
    return ExportReport(Path(out_dir), metadata, diff, parity_requests, time.perf_counter() - started, added)
