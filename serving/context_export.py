"""Two-stage export: the graph variant that returns each request's context vector (and the exact
scores of its candidates), and the item index built from the same exported item table.

Written beside model.onnx in the export directory (context.onnx, item_index.*); the model repository
copies them into the python model's version directory, whose model.py then answers through
serving/item_index.py instead of the exact graph.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unirank.model.request import INPUT_NAMES
from unirank.serving.export import _dynamic_shapes, _rewrite_bool_where, example_inputs, onnx_session
from unirank.serving.item_index import (CONTEXT_MODEL_FILE, CONTEXT_OUTPUTS, INDEX_FILES, IndexOptions, ItemIndex,
                                        TwoStageRanker)

log = logging.getLogger(__name__)


class ContextRanker(nn.Module):
    """Request schema in; context vector [B, d] and exact candidate scores [B, C] out."""

    def __init__(self, ranker: nn.Module):
        super().__init__()
        self.ranker = ranker

    def forward(self, task, history, history_lengths, query, query_lengths, source_item, candidates):
        context = self.ranker(task, history, history_lengths, query, query_lengths, source_item)
        return context, self.ranker.score(context, candidates)


def item_vectors(plain_ranker: nn.Module) -> np.ndarray:
    """The exported item table of ids 1..num_items [N, d] (what the exact graph scores)."""
    table = plain_ranker.item_tower.all_items()
    return table[1 : int(plain_ranker.num_items) + 1].detach().float().numpy()


def export_context_onnx(plain_ranker: nn.Module, out_dir: str | Path) -> Path:
    """out_dir/context.onnx, with the exact graph's dynamic batch and lengths."""
    path = Path(out_dir) / CONTEXT_MODEL_FILE
    limits = (int(plain_ranker.config.max_history), int(plain_ranker.config.max_query_len))
    with torch.no_grad():
        program = torch.onnx.export(ContextRanker(plain_ranker).eval(), example_inputs(*limits), dynamo=True,
                                    input_names=list(INPUT_NAMES), output_names=list(CONTEXT_OUTPUTS),
                                    dynamic_shapes=_dynamic_shapes(*limits), optimize=True)
    program.save(str(path))
    _rewrite_bool_where(path)
    return path


def build_item_index(plain_ranker: nn.Module, options: IndexOptions) -> ItemIndex:
    """The index over the exported item table, with the model's similarity and temperature."""
    config = plain_ranker.config
    return ItemIndex.build(item_vectors(plain_ranker), config.similarity, config.temperature, options)


def export_two_stage(plain_ranker: nn.Module, out_dir: str | Path, options: IndexOptions) -> ItemIndex:
    """context.onnx + the item index into out_dir (beside the exact graph's model.onnx)."""
    export_context_onnx(plain_ranker, out_dir)
    index = build_item_index(plain_ranker, options)
    index.save(out_dir)
    log.info("item index %s: %d items", options.kind, len(index))
    return index


def remove_two_stage(out_dir: str | Path) -> None:
    for name in (CONTEXT_MODEL_FILE, *INDEX_FILES):
        (Path(out_dir) / name).unlink(missing_ok=True)


def load_two_stage(directory: str | Path, top_k: int, threads: int = 1) -> TwoStageRanker:
    """The served two-stage answer, in process (tests, benchmarks)."""
    return TwoStageRanker(onnx_session(Path(directory) / CONTEXT_MODEL_FILE, threads), ItemIndex.load(directory), top_k)
