"""One scoring module (model/scoring.py): the exported graph answers what offline evaluation ranks,
for users whose history is longer than the model reads (the older items travel as `exclude`); a
score term added through the scoring module alone reaches the loss, evaluation and the graph; and
the exclude list's contract is kept by every flavour."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import NUM_ITEMS, TOP_K
from unirank.model.request import INPUT_NAMES, MAX_EXCLUDE, Task
from unirank.model.scoring import ScoreTerm
from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
from unirank.serving.metadata import OUTPUT_NAMES
from unirank.serving.request_arrays import RequestError, RequestLimits, check_request, pad_and_stack
from unirank.serving.synthetic_requests import random_batches

MAX_HISTORY = 4


@pytest.fixture(scope="module")
def prepared():
    from unirank.config import load_config
    from unirank.data.prepare import build_ranker, prepare

    cfg = load_config(None, ["data.synthetic.num_users=120", "data.synthetic.num_items=50", "model.dim=16",
                             f"model.max_history={MAX_HISTORY}", "model.num_layers=1"])
    prep = prepare(cfg)
    return prep, build_ranker(cfg, prep).eval()


def _feed(request) -> dict[str, np.ndarray]:
    arrays = {n: getattr(request, n) for n in INPUT_NAMES if getattr(request, n) is not None}
    arrays["candidates"] = torch.zeros(request.batch_size, 1, dtype=torch.int64)
    return {n: np.ascontiguousarray(arrays[n].numpy(), dtype=np.int64) for n in INPUT_NAMES}


def _offline_top(ranker, builder, task, cases, rows, k):
    from unirank.evaluation.evaluate import ModelScorer, hide_excluded, with_seen

    histories = [cases.histories[i] for i in rows]
    request = with_seen(task, builder.build(task, cases.users[rows], histories, cases.targets[rows]), histories)
    scores = hide_excluded(ModelScorer(ranker).scores(task, request), task, request)
    top = scores.topk(k, dim=1)
    return request, top.indices.numpy(), top.values.numpy()


@pytest.mark.parametrize("task", [Task.SEARCH, Task.PREQUERY, Task.SIMILAR])
def test_the_graph_answers_what_offline_evaluation_ranks_for_long_histories(prepared, tmp_path, task):
    prep, ranker = prepared
    cases, n = prep.split.valid, prep.data.num_items
    rows = np.array([i for i, h in enumerate(cases.histories) if len(h) > MAX_HISTORY + 2][:24])
    assert len(rows) >= 8
    export_onnx(ranker.to_plain(), tmp_path, top_k=n)  # k = the whole catalogue: every shown item is compared
    request, ids, scores = _offline_top(ranker, prep.builder, task, cases, rows, n)
    graph_ids, graph_scores = onnx_session(tmp_path / "model.onnx").run(OUTPUT_NAMES, _feed(request))
    for row, user in enumerate(rows):
        seen = set(cases.histories[user].tolist())
        filled = np.isfinite(scores[row])
        hidden = seen if task != Task.SIMILAR else {int(request.source_item[row])}
        assert filled.sum() == n - len(hidden)  # the older history, beyond max_history, is hidden too
        assert graph_ids[row][filled].tolist() == ids[row][filled].tolist()
        assert (graph_ids[row][~filled] == 0).all()
        np.testing.assert_allclose(graph_scores[row][filled], scores[row][filled], atol=1e-4)


class ParityTerm(ScoreTerm):
    """A toy term: a learned weight times a fixed per-item bias, on every item row."""

    def __init__(self, num_items: int):
        super().__init__()
        self.register_buffer("bias", torch.linspace(-3.0, 3.0, num_items + 2).flip(0))
        self.weight = torch.nn.Parameter(torch.ones(()))

    def scores(self, view, candidates=None):
        bias = self.weight * self.bias
        if candidates is None:
            return bias.expand(view.task.shape[0], -1)
        return bias[candidates.clamp(0, len(self.bias) - 1)]


def test_a_term_added_in_the_scoring_module_reaches_loss_evaluation_and_the_graph(prepared, tmp_path):
    from unirank.data.examples import TrainingExamples
    from unirank.evaluation.evaluate import ModelScorer
    from unirank.model.tokenizer import WordTokenizer
    from unirank.serving.metadata import ExportMetadata
    from unirank.training.loss import item_frequencies, softmax_loss
    prep, base = prepared
    ranker = copy.deepcopy(base)
    ranker.terms["parity"] = ParityTerm(ranker.num_items)
    # the loss: the term's weight gets a gradient from the full and the sampled softmax
    ranker.train()
    batch = next(TrainingExamples(prep.split, prep.builder, 32, seed=0).epoch())
    freq = item_frequencies(prep.split.train, prep.data.num_items)
    weights = {Task.SEARCH: 1.0, Task.SIMILAR: 1.0, Task.PREQUERY: 1.0}
    for negatives in (0, 8):
        ranker.zero_grad()
        loss, _ = softmax_loss(ranker, batch, negatives, freq, torch.Generator().manual_seed(0), weights)
        loss.backward()
        assert float(ranker.terms["parity"].weight.grad.abs()) > 0
    ranker.eval()
    # offline evaluation: the scores are the vector score plus the term
    cases = prep.split.valid
    rows = np.arange(8)
    request = prep.builder.build(Task.PREQUERY, cases.users[rows], [cases.histories[i] for i in rows], cases.targets[rows])
    with_term = ModelScorer(ranker).scores(Task.PREQUERY, request)
    without = ModelScorer(base).scores(Task.PREQUERY, request)
    torch.testing.assert_close(with_term, without + ranker.terms["parity"].bias)
    # the graph: ONNX Runtime answers with the term, and differs from the graph without it
    plain = ranker.to_plain()
    export_onnx(plain, tmp_path, top_k=10, tokenizer=WordTokenizer(["a", "b"]))
    batches = random_batches(ExportMetadata.load(tmp_path / "export.json"), vocab_size=4, requests=48, seed=0)
    session = onnx_session(tmp_path / "model.onnx")
    assert parity_max_abs_diff(TopKRanker(plain, 10).eval(), session, batches) <= 1e-4
    off = ranker.to_plain()
    with torch.no_grad():
        off.terms["parity"].weight.zero_()
    assert parity_max_abs_diff(TopKRanker(off, 10).eval(), session, batches) > 1e-3


def _row(task=2, exclude=(), exclude_length=None, width=None):
    exclude = list(exclude)
    padded = np.zeros((1, max(1, width or len(exclude))), dtype=np.int64)
    padded[0, : len(exclude)] = exclude
    return {"task": np.array([task]), "history": np.array([[3, 4]]), "history_lengths": np.array([2]),
            "query": np.array([[0]]), "query_lengths": np.array([0]), "source_item": np.array([7 if task == 1 else 0]),
            "candidates": np.array([[0]]), "exclude": padded,
            "exclude_lengths": np.array([len(exclude) if exclude_length is None else exclude_length])}


BAD_EXCLUSIONS = [
    ("exclude_lengths", "negative length", _row(exclude=[5], exclude_length=-1)),
    ("exclude_lengths", "length > padded exclude width", _row(exclude=[5, 6], exclude_length=3)),
    ("exclude_lengths", f"more exclude ids than the limit {MAX_EXCLUDE}", _row(exclude=range(1, MAX_EXCLUDE + 2))),
    ("exclude", "negative id", _row(exclude=[5, -2])),
]


@pytest.mark.parametrize("field,message,arrays", BAD_EXCLUSIONS, ids=[m for _, m, _ in BAD_EXCLUSIONS])
def test_bad_exclusions_are_refused_alike_by_the_numpy_checks_and_the_graph(field, message, arrays, session):
    with pytest.raises(RequestError, match=f"^{field}: {message}") as err:
        check_request(arrays, RequestLimits(NUM_ITEMS, 12, 6))
    assert err.value.field == field
    with pytest.raises(Exception, match=f"{field}: {message}"):
        session.run(OUTPUT_NAMES, {n: np.ascontiguousarray(arrays[n], dtype=np.int64) for n in INPUT_NAMES})


@pytest.mark.parametrize("task", [0, 1, 2])
def test_excluded_ids_are_never_returned_and_unknown_ones_are_harmless(task, session, plain_topk):
    from conftest import torch_topk

    first = pad_and_stack([_row(task)])
    first["query"], first["query_lengths"] = np.array([[3, 4]]), np.array([2 if task == 0 else 0])
    top = session.run(OUTPUT_NAMES, first)[0][0]
    excluded = [*top[:3].tolist(), NUM_ITEMS + 40]
    arrays = dict(first, exclude=np.array([excluded]), exclude_lengths=np.array([len(excluded)]))
    ids, scores = session.run(OUTPUT_NAMES, arrays)
    assert not set(excluded) & set(ids[0].tolist())
    assert ids[0][: TOP_K - 3].tolist() == top[3:].tolist()  # the rest moves up, in order
    torch_ids, torch_scores = torch_topk(plain_topk, arrays)
    assert torch_ids.tolist() == ids.tolist()
    # an excluded candidate is dropped as well
    cands = dict(arrays, candidates=np.array([[top[0], top[5], 0]]))
    assert session.run(OUTPUT_NAMES, cands)[0][0][:2].tolist() == [top[5], 0]


def test_the_client_moves_the_older_history_into_exclude(export_dir, tokenizer):
    from unirank.serving.client import RequestBuilder
    from unirank.serving.metadata import ExportMetadata

    builder = RequestBuilder(tokenizer, ExportMetadata.load(export_dir / "export.json"))
    history = list(range(1, 31))  # 30 items, the model reads the newest 12
    arrays = builder.build(Task.PREQUERY, history, exclude=[200, 201])
    assert arrays["history"][0, : arrays["history_lengths"][0]].tolist() == history[-12:]
    assert arrays["exclude"][0, : arrays["exclude_lengths"][0]].tolist() == [200, 201, *reversed(history[:-12])]
    long = builder.build(Task.SEARCH, list(range(1, MAX_EXCLUDE + 100)), "wa", exclude=[250])
    assert long["exclude_lengths"][0] == MAX_EXCLUDE and long["exclude"][0, 0] == 250
    with pytest.raises(RequestError, match="exclude_lengths"):
        builder.build(Task.SIMILAR, source_item=5, exclude=list(range(1, MAX_EXCLUDE + 2)))


def test_candidate_membership_by_sorting_equals_the_id_by_id_comparison():
    from unirank.model.scoring import hidden_candidates

    gen = torch.Generator().manual_seed(0)
    for width_c, width_k in [(1, 1), (7, 3), (40, 25), (300, 50)]:
        candidates = torch.randint(-3, 30, (6, width_c), generator=gen)
        hidden = torch.randint(-3, 30, (6, width_k), generator=gen)
        hidden[:, ::3] = 0  # padding marks nothing
        if width_c >= 3:
            candidates[0, :3] = torch.tensor([2 ** 62, -(2 ** 63), 2 ** 63 - 1])  # keys must not overflow
        expected = ((candidates[:, :, None] == hidden[:, None, :]) & (hidden[:, None, :] != 0)).any(dim=2)
        assert torch.equal(hidden_candidates(candidates, hidden), expected)
    huge = torch.tensor([[2 ** 62, 5]])
    assert hidden_candidates(huge, torch.tensor([[2 ** 63 - 1]])).tolist() == [[True, False]]  # documented


def test_a_request_at_the_widest_candidates_and_exclude_costs_what_its_inputs_cost(session):
    """10,000 candidates and MAX_EXCLUDE excluded ids on 8 rows: the graph once built a [B, C, X]
    comparison (0.9 GB here); sorting keeps it to a few MB of intermediates, and the answer keeps
    the rules (no excluded id returned, only candidates)."""
    import resource

    rows, width = 8, 10_000
    rng = np.random.default_rng(0)
    arrays = pad_and_stack([_row(task, exclude=rng.integers(1, NUM_ITEMS + 1, MAX_EXCLUDE).tolist())
                            for task in [0, 1, 2] * 3][:rows])
    arrays["candidates"] = rng.integers(1, NUM_ITEMS + 100, (rows, width))
    arrays["query_lengths"][:] = 0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids, _ = session.run(OUTPUT_NAMES, arrays)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB"
    for row in range(rows):
        returned = set(ids[row][ids[row] > 0].tolist())
        assert returned <= set(arrays["candidates"][row].tolist())
        assert not returned & set(arrays["exclude"][row].tolist())
