"""The trained ranker as ONE ONNX graph that answers the item tasks with top-k item ids and,
for a model trained with a query catalogue, suggest rows (task 3) with top-k query ids.

Graph contract (also what Triton serves):
  inputs   the request schema, all int64: task [B], history [B, L], history_lengths [B],
           query [B, Q], query_lengths [B], source_item [B], candidates [B, C], exclude [B, X],
           exclude_lengths [B]; L, Q, C, X >= 1 (send one padding column for "none": ONNX Runtime
           rejects zero-width inputs here).
  outputs  item_ids [B, K] int64 and scores [B, K] float32, best first, K = min(top_k, num_items
           [, num_queries]) fixed at export time (a fixed output shape lets Triton batch any mix of
           requests). On suggest rows item_ids holds query ids: queries.json beside the graph (and
           the model config's `queries` parameter) gives their text.
A graph whose weights pass protobuf's 2 GB limit (the item table of ~8 M items at d=64) is written
with ONNX external data: model.onnx plus model.onnx.data beside it, loaded from the file path by
ONNX Runtime (both Triton flavours create their session from the path).
Rules baked into the graph:
  - a row whose candidates are all padding ranks the whole catalogue (ids 1..num_items);
    otherwise it ranks exactly its non-zero candidates;
  - each candidate id is ranked once (repeats are dropped);
  - search and pre-query rows never return items of the user's history, known to the model or
    not; similar-item rows never return the source item; no item row returns an id of its
    exclude list (model/scoring.py hidden_ids, the rule of training and offline evaluation too);
  - slots that cannot be filled (fewer candidates than K) have item_id 0 and score -inf;
  - unknown item ids (outside 1..num_items) are embedded with the model's OOV row, never crash;
  - suggest rows rank the whole query catalogue, or exactly their non-zero candidates (query ids;
    unknown ones are never returned), repeats once, nothing filtered (a past search may come back).
The request contract (model/request.py RULES) is checked inside the graph (graph_checks.py) and,
with the same rules, by the client and the python-backend model (request_arrays.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unirank.model.request import INPUT_NAMES, ROW_FIELDS, QueryTask, Task
from unirank.model.scoring import hidden_candidates, hidden_catalogue, hidden_ids
from unirank.serving.graph_checks import add_request_checks
from unirank.serving.metadata import (METADATA_FILE, MODEL_FILE, OUTPUT_NAMES, QUERIES_FILE, TOKENIZER_FILE, ExportMetadata,
                                      external_data_file)
from unirank.serving.request_arrays import RequestLimits


class TopKRanker(nn.Module):
    """Request schema in, top-k (item_ids, scores) out; wraps a plain (TorchRec-free) ranker."""

    def __init__(self, ranker: nn.Module, top_k: int):
        super().__init__()
        self.ranker = ranker
        self.num_items = int(ranker.num_items)
        self.num_queries = int(ranker.config.num_queries)
        self.top_k = min(int(top_k), self.num_items, *([self.num_queries] if self.num_queries else []))

    def forward(self, task, history, history_lengths, query, query_lengths, source_item, candidates, exclude,
                exclude_lengths):
        context = self.ranker(task, history, history_lengths, query, query_lengths, source_item)
        hidden = hidden_ids(task, history, history_lengths, source_item, exclude, exclude_lengths)
        top_ids, top_scores = self._top_items(context, (task, history, history_lengths, query, query_lengths,
                                                        source_item), candidates, hidden)
        if self.num_queries:
            query_ids, query_scores = self._top_queries(context, candidates)
            suggest = (task == int(QueryTask.SUGGEST)).unsqueeze(1)
            top_ids, top_scores = torch.where(suggest, query_ids, top_ids), torch.where(suggest, query_scores, top_scores)
        return top_ids, top_scores

    def _top_queries(self, context, candidates):
        """Top-k query ids of every row: its non-zero candidates (ids outside the catalogue hidden),
        or the whole catalogue when they are all padding; no seen filter."""
        batch, n = context.shape[0], self.num_queries
        known = (candidates >= 1) & (candidates <= n)
        use_catalogue = (candidates == 0).all(dim=1, keepdim=True)
        cand_scores = self.ranker.score_queries(context, torch.where(known, candidates, torch.zeros_like(candidates)))
        cand_scores = cand_scores.masked_fill(~known | use_catalogue | _repeated(candidates), float("-inf"))
        catalogue_scores = self.ranker.score_queries(context)[:, 1: n + 1].masked_fill(~use_catalogue, float("-inf"))
        ids = torch.cat([candidates, torch.arange(1, n + 1, device=context.device).expand(batch, -1)], dim=1)
        return _top(ids, torch.cat([cand_scores, catalogue_scores], dim=1), self.top_k)

    def _top_items(self, context, inputs, candidates, hidden):
        """Top-k item ids of every row; `hidden` [B, K]: the ids it must not return (hidden_ids)."""
        batch = context.shape[0]
        cand_scores = self.ranker.score(context, candidates, inputs)
        catalogue_scores = self.ranker.score(context, None, inputs)[:, 1 : self.num_items + 1]
        catalogue_ids = torch.arange(1, self.num_items + 1, device=context.device).expand(batch, -1)

        use_catalogue = (candidates == 0).all(dim=1, keepdim=True)
        hidden_cand = (candidates == 0) | use_catalogue | _repeated(candidates) | hidden_candidates(candidates, hidden)
        cand_scores = cand_scores.masked_fill(hidden_cand, float("-inf"))
        catalogue_scores = catalogue_scores.masked_fill(~use_catalogue, float("-inf"))
        catalogue_scores = catalogue_scores.masked_fill(hidden_catalogue(hidden, self.num_items)[:, 1:], float("-inf"))
        ids = torch.cat([candidates, catalogue_ids], dim=1)
        scores = torch.cat([cand_scores, catalogue_scores], dim=1)
        return _top(ids, scores, self.top_k)


def _top(ids: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (ids, scores) per row; unfilled slots (-inf) get id 0."""
    top_scores, top_index = scores.topk(k, dim=1)
    return ids.gather(1, top_index).masked_fill(top_scores == float("-inf"), 0), top_scores


def _repeated(ids: torch.Tensor) -> torch.Tensor:
    """[B, C] True on every copy of an id but one, so that duplicate candidates are ranked once."""
    ordered, order = ids.sort(dim=1)
    repeat = torch.cat([torch.zeros_like(ordered[:, :1]), (ordered[:, 1:] == ordered[:, :-1]).long()], dim=1)
    return torch.zeros_like(ids).scatter(1, order, repeat) > 0


def example_inputs(max_history: int, max_query_len: int, batch: int = 3, candidates: int = 6,
                   exclude: int = 7) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; every dynamic dimension is >= 2 so that torch.export does not specialize it."""
    history, query = min(5, max_history), min(4, max_query_len)
    ones = torch.ones(batch, dtype=torch.long)
    return (
        torch.arange(batch) % len(Task),
        torch.ones(batch, history, dtype=torch.long),
        ones * history,
        torch.ones(batch, query, dtype=torch.long),
        ones * query,
        ones,
        torch.ones(batch, candidates, dtype=torch.long),
        torch.ones(batch, exclude, dtype=torch.long),
        ones * exclude,
    )


def _dynamic_shapes(max_history: int, max_query_len: int) -> dict:
    """Dynamic batch and lengths; history and query are bounded by the model's limits (positions
    beyond the table do not exist; longer requests are rejected before the graph)."""
    if min(max_history, max_query_len) < 2:
        raise ValueError("export needs max_history and max_query_len >= 2 (dynamic dimensions)")
    batch = torch.export.Dim("batch", min=1, max=65_536)
    length = {
        "history": torch.export.Dim("history_len", min=1, max=max_history),
        "query": torch.export.Dim("query_len", min=1, max=max_query_len),
        "candidates": torch.export.Dim("candidates_len", min=1, max=1_000_000),
        "exclude": torch.export.Dim("exclude_len", min=1, max=1_000_000),
    }
    return {name: ({0: batch} if name in ROW_FIELDS else {0: batch, 1: length[name]}) for name in INPUT_NAMES}


def export_onnx(ranker: nn.Module, out_dir: str | Path, top_k: int = 100, tokenizer=None,
                external_data: bool | None = None, query_texts: list[str] | None = None) -> ExportMetadata:
    """Write model.onnx (+ tokenizer.json, export.json, and queries.json for a model with a query
    catalogue: `query_texts`, id = position + 1) for a plain ranker into out_dir.
    `external_data`: weights in model.onnx.data (None: only when they pass protobuf's 2 GB)."""
    num_queries = int(ranker.config.num_queries)
    if len(query_texts or ()) != num_queries:
        raise ValueError(f"the model has {num_queries} queries: export needs their {num_queries} texts, "
                         f"got {len(query_texts or ())}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = TopKRanker(ranker, top_k).eval()
    limits = (int(ranker.config.max_history), int(ranker.config.max_query_len))
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            example_inputs(*limits),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=OUTPUT_NAMES,
            dynamic_shapes=_dynamic_shapes(*limits),
            optimize=True,
        )
    (out_dir / external_data_file(MODEL_FILE)).unlink(missing_ok=True)
    program.save(str(out_dir / MODEL_FILE), external_data=external_data)
    _rewrite_bool_where(out_dir / MODEL_FILE)
    add_request_checks(out_dir / MODEL_FILE, RequestLimits(module.num_items, *limits, num_queries=num_queries))
    (out_dir / QUERIES_FILE).unlink(missing_ok=True)
    if num_queries:
        (out_dir / QUERIES_FILE).write_text(json.dumps(list(query_texts)))
    metadata = ExportMetadata(
        num_items=module.num_items,
        max_history=limits[0],
        max_query_len=limits[1],
        top_k=module.top_k,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        onnx_opset=int(program.model.opset_imports.get("", 0)),
        num_queries=num_queries,
    )
    metadata.save(out_dir / METADATA_FILE)
    if tokenizer is not None:
        tokenizer.save(out_dir / TOKENIZER_FILE)
    return metadata


def _rewrite_bool_where(path: Path) -> int:
    """ONNX Runtime's CPU Where has no bool kernel ("Could not find an implementation for Where(16)");
    torch.where on bool masks (the ranker's attention mask) exports to exactly that. Rewrites each
    such node as (c AND x) OR (NOT c AND y). Returns the number of rewritten nodes."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)  # nodes only: external weights stay where they are
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    elem_type = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        if node.op_type != "Where" or elem_type.get(node.output[0]) != TensorProto.BOOL:
            nodes.append(node)
            continue
        cond, x, y = node.input
        tmp = [f"{node.output[0]}__bool_where_{i}" for i in range(3)]
        nodes += [
            helper.make_node("And", [cond, x], [tmp[0]]),
            helper.make_node("Not", [cond], [tmp[1]]),
            helper.make_node("And", [tmp[1], y], [tmp[2]]),
            helper.make_node("Or", [tmp[0], tmp[2]], [node.output[0]], name=node.name),
        ]
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))  # by path: external weights checked, no 2 GB message
    return rewritten


def onnx_session(path: str | Path, threads: int = 1, graph_optimization: str = "ORT_ENABLE_ALL",
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session with the options the served models use (model_repository.EndpointSpec):
    a fixed intra-op thread count, sequential graph, a GraphOptimizationLevel name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, graph_optimization)
    return ort.InferenceSession(str(path), options, providers=list(providers))


def parity_max_abs_diff(module: TopKRanker, session, batches: list[dict[str, np.ndarray]]) -> float:
    """Max |score_ort - score_torch| over the returned top-k of every batch.

    The two best-first score lists are compared position by position: equal scores whose ids come
    in another order (ties) do not count, any other difference in scores or ranking does. Raises
    when the two disagree on which slots are filled (candidate / catalogue / filtering rules)."""
    worst = 0.0
    with torch.no_grad():
        for feed in batches:
            ort_ids, ort_scores = session.run(OUTPUT_NAMES, feed)
            torch_ids, torch_scores = (t.numpy() for t in module(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES)))
            finite = np.isfinite(torch_scores)
            if not np.array_equal(finite, np.isfinite(ort_scores)) or not np.array_equal(ort_ids == 0, torch_ids == 0):
                raise AssertionError("ONNX Runtime and PyTorch disagree on which top-k slots are filled")
            worst = max(worst, float(np.abs(ort_scores[finite] - torch_scores[finite]).max(initial=0.0)))
    return worst
