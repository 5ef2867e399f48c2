"""Two-stage export: the graph variant that returns each request's context vector (and the exact
scores of its candidates), and the item index built from the same exported item table.

Written beside model.onnx in the export directory (context.onnx, item_table.npy, item_index.*); the
model repository copies them into the python model's version directory, whose model.py then answers
through serving/item_index.py instead of the exact graph.

The context graph holds no item table: the table ([num_items + 2, d], the history, source and
candidate vectors) is its input `item_table`, fed from item_table.npy memory-mapped (ONNX Runtime
reads the mapped array in place: only the rows a request touches are paged in). So context.onnx
stays a few MB at any catalogue size, and the served process holds the index, not a second table.
It checks the request contract as the exact graph does (graph_checks.py).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unirank.model.request import INPUT_NAMES
from unirank.serving.onnx_graph import _dynamic_shapes, _rewrite_bool_where, example_inputs, onnx_session
from unirank.serving.graph_checks import add_request_checks
from unirank.serving.item_index import (CONTEXT_MODEL_FILE, CONTEXT_OUTPUTS, INDEX_FILES, ITEM_TABLE_FILE, TABLE_INPUT,
                                        IndexOptions, ItemIndex, TwoStageRanker)
from unirank.serving.request_arrays import RequestLimits


log = logging.getLogger(__name__)


class ContextRanker(nn.Module):
    """Request schema in; context vector [B, d] and exact candidate scores [B, C] out."""

    def __init__(self, ranker: nn.Module):
        super().__init__()
        self.ranker = ranker

    def forward(self, task, history, history_lengths, query, query_lengths, source_item, candidates, exclude,
                exclude_lengths):
        """`exclude` is applied after the index (item_index.two_stage_topk); the graph only keeps it
        an input, so that both flavours take the same request."""
        inputs = (task, history, history_lengths, query, query_lengths, source_item)
        context = self.ranker(*inputs)
        scores = self.ranker.score(context, candidates, inputs)  # with the score terms an index serves
        return context, scores + 0 * (exclude.sum() + exclude_lengths.sum()).to(scores.dtype)


def item_vectors(plain_ranker: nn.Module) -> np.ndarray:
    """The exported item table of ids 1..num_items [N, d] (what the exact graph scores)."""
    table = plain_ranker.item_tower.all_items()
    return table[1 : int(plain_ranker.num_items) + 1].detach().float().numpy()


def export_context_onnx(plain_ranker: nn.Module, out_dir: str | Path) -> Path:
    """out_dir/context.onnx (the exact graph's dynamic batch and lengths and request checks; the item
    table as input `item_table`) and out_dir/item_table.npy."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CONTEXT_MODEL_FILE
    limits = (int(plain_ranker.config.max_history), int(plain_ranker.config.max_query_len))
    table = plain_ranker.item_tower.table
    # Traced on a 2-row random stand-in (found again by its values): the table becomes an input, so
    # the catalogue never enters the graph.
    stand_in = torch.randn(2, table.shape[1], generator=torch.Generator().manual_seed(0))
    traced = copy.deepcopy(plain_ranker, {id(table): stand_in})
    with torch.no_grad():
        program = torch.onnx.export(ContextRanker(traced).eval(), example_inputs(*limits), dynamo=True,
                                    input_names=list(INPUT_NAMES), output_names=list(CONTEXT_OUTPUTS),
                                    dynamic_shapes=_dynamic_shapes(*limits), optimize=True)
    program.save(str(path))
    _rewrite_bool_where(path)
    add_request_checks(path, RequestLimits(int(plain_ranker.num_items), *limits))
    _table_as_input(path, stand_in.numpy())
    np.save(out_dir / ITEM_TABLE_FILE, table.detach().float().numpy())
    return path


def _table_as_input(path: Path, stand_in: np.ndarray) -> None:
    """The traced stand-in table (an initializer) becomes the graph input `item_table` [rows, d]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    found = [t for t in graph.initializer if list(t.dims) == list(stand_in.shape)
             and np.array_equal(numpy_helper.to_array(t), stand_in)]
    if len(found) != 1:
        raise ValueError(f"{path}: expected the item table once among the initializers, found it {len(found)} times")
    name = found[0].name
    graph.initializer.remove(found[0])
    graph.input.append(helper.make_tensor_value_info(TABLE_INPUT, TensorProto.FLOAT, ["table_rows", stand_in.shape[1]]))
    for node in graph.node:
        node.input[:] = [TABLE_INPUT if i == name else i for i in node.input]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def item_bias(plain_ranker: nn.Module) -> np.ndarray | None:
    """[N] the score terms that depend on the item alone (the fresh items' boost), for ids
    1..num_items; None when the model has none."""
    fresh = plain_ranker.terms["fresh"] if "fresh" in plain_ranker.terms else None
    return None if fresh is None else fresh.bonus[1 : int(plain_ranker.num_items) + 1].detach().float().numpy()


def build_item_index(plain_ranker: nn.Module, options: IndexOptions) -> ItemIndex:
    """The index over the exported item table, with the model's similarity, temperature and
    per-item score terms."""
    config = plain_ranker.config
    return ItemIndex.build(item_vectors(plain_ranker), config.similarity, config.temperature, options,
                           bias=item_bias(plain_ranker))


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
