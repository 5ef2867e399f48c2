"""UnifiedRanker: shapes for every task, masking, causality, empty history, OOV ids, plain export copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unirank.model.catalogue import Catalogue

from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import Task
from unirank.model.sparse_features import EmbeddingTables
from unirank.model.tokenizer import OOV_TOKEN_ID

NUM_ITEMS, NUM_WORDS, NUM_ATTRS, DIM, MAX_HIST = 50, 30, 8, 16, 12


def make_ranker(seed: int = 0, **overrides) -> UnifiedRanker:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    attributes = [[]] + [rng.integers(1, NUM_ATTRS, size=2).tolist() for _ in range(NUM_ITEMS)]
    words = [[]] + [rng.integers(2, NUM_WORDS, size=3).tolist() for _ in range(NUM_ITEMS)]
    cfg = RankerConfig(num_items=NUM_ITEMS, num_attributes=NUM_ATTRS, num_words=NUM_WORDS, dim=DIM, num_heads=2,
                       max_history=MAX_HIST, max_query_len=6, **overrides)
    return UnifiedRanker(cfg, Catalogue(attributes, words)).eval()


def with_live_heads(ranker: UnifiedRanker, seed: int = 0) -> UnifiedRanker:
    """Per-task heads moved off their zero start, so that each task's head changes its rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ranker.task_heads.down.copy_(torch.randn(ranker.task_heads.down.shape, generator=g) * 0.3)
    return ranker


@pytest.fixture(scope="module", params=["prenorm", "ligr", "ligr+filter", "ligr+heads"])
def ranker(request) -> UnifiedRanker:
    """Every behavioural test runs on both block kinds (model.block), on attention blended with the
    causal filter (model.filter_mix) and with a head per task (model.task_heads)."""
    block, _, extra = request.param.partition("+")
    if extra == "heads":
        return with_live_heads(make_ranker(block=block, task_heads=8))
    return make_ranker(block=block, filter_mix=0.5 if extra == "filter" else 0.0)


def inputs(task: Task, b: int = 3, width: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([width, 3, 0][:b] + [1] * max(0, b - 3))
    history = torch.randint(1, NUM_ITEMS + 1, (b, width), generator=g)
    history = history * (torch.arange(width) < lengths.unsqueeze(1))
    return {"task": torch.full((b,), int(task)), "history": history, "history_lengths": lengths,
            "query": torch.randint(2, NUM_WORDS, (b, 4), generator=g), "query_lengths": torch.tensor([4, 2, 1][:b] + [1] * max(0, b - 3)),
            "source_item": torch.randint(1, NUM_ITEMS + 1, (b,), generator=g)}


@torch.no_grad()
def out(ranker, **kw) -> torch.Tensor:
    return ranker(**kw)


@pytest.mark.parametrize("task", list(Task))
def test_output_shapes(ranker, task):
    x = inputs(task)
    ctx = out(ranker, **x)
    assert ctx.shape == (3, DIM)
    with torch.no_grad():
        assert ranker.score(ctx).shape == (3, NUM_ITEMS + 2)
        assert ranker.score(ctx, torch.tensor([[1, 2, 3, 4]] * 3)).shape == (3, 4)
        hidden, lengths, extra = ranker.encode(**x, extra_items=torch.tensor([1, 2, 3]))
    assert hidden.shape == (3, 2 + 8, DIM) and extra.shape == (3, DIM)
    expected_len = [2, 2, 2] if task == Task.SIMILAR else [10, 5, 2]
    assert lengths.tolist() == expected_len
    assert torch.isfinite(ctx).all()


def test_mixed_task_batch_matches_single_task_rows(ranker):
    rows = [inputs(t, b=1, seed=3) for t in Task]
    mixed = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    separate = torch.cat([out(ranker, **r) for r in rows])
    torch.testing.assert_close(out(ranker, **mixed), separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", [Task.SEARCH, Task.PREQUERY])
def test_padding_beyond_history_lengths_is_ignored(ranker, task):
    x = inputs(task)
    base = out(ranker, **x)
    noisy = dict(x, history=x["history"].clone())
    noisy["history"][1, 3:] = torch.tensor([7, 8, 9, 10, 11])  # row 1 has length 3
    noisy["history"][2, :] = 5  # row 2 has length 0
    torch.testing.assert_close(out(ranker, **noisy), base, rtol=0, atol=1e-6)
    # ...while a change inside the valid part does change the output
    changed = dict(x, history=x["history"].clone())
    changed["history"][1, 2] = (changed["history"][1, 2] % NUM_ITEMS) + 1
    assert not torch.allclose(out(ranker, **changed)[1], base[1], atol=1e-4)


def test_query_padding_beyond_query_lengths_is_ignored(ranker):
    x = inputs(Task.SEARCH)
    noisy = dict(x, query=x["query"].clone())
    noisy["query"][1, 2:] = 3
    noisy["query"][2, 1:] = 4
    torch.testing.assert_close(out(ranker, **noisy), out(ranker, **x), rtol=0, atol=1e-6)


def test_similar_item_ignores_history_and_query(ranker):
    x = inputs(Task.SIMILAR)
    other = dict(x, history=torch.randint(1, NUM_ITEMS + 1, x["history"].shape), history_lengths=torch.tensor([8, 8, 8]),
                 query=torch.randint(2, NUM_WORDS, x["query"].shape))
    torch.testing.assert_close(out(ranker, **other), out(ranker, **x), rtol=0, atol=1e-6)
    source = dict(x, source_item=(x["source_item"] % NUM_ITEMS) + 1)
    assert not torch.allclose(out(ranker, **source), out(ranker, **x), atol=1e-4)


def test_prequery_ignores_query_and_source_search_ignores_source(ranker):
    x = inputs(Task.PREQUERY)
    other = dict(x, query=torch.randint(2, NUM_WORDS, x["query"].shape), source_item=torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out(ranker, **other), out(ranker, **x), rtol=0, atol=1e-6)
    s = inputs(Task.SEARCH)
    torch.testing.assert_close(out(ranker, **dict(s, source_item=torch.tensor([4, 5, 6]))), out(ranker, **s),
                               rtol=0, atol=1e-6)
    changed_query = dict(s, query=(s["query"] + 1).clamp(max=NUM_WORDS - 1))
    assert not torch.allclose(out(ranker, **changed_query), out(ranker, **s), atol=1e-4)


@pytest.mark.parametrize("task", [Task.SEARCH, Task.PREQUERY])
def test_history_is_causal(ranker, task):
    x = inputs(task, b=1)
    k = 4  # history position k sits at token NUM_PREFIX + k
    changed = dict(x, history=x["history"].clone())
    changed["history"][0, k] = (changed["history"][0, k] % NUM_ITEMS) + 1
    with torch.no_grad():
        before, _, _ = ranker.encode(**x)
        after, _, _ = ranker.encode(**changed)
    torch.testing.assert_close(after[:, : 2 + k], before[:, : 2 + k], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 2 + k], before[:, 2 + k], atol=1e-4)
    assert not torch.allclose(after[:, -1], before[:, -1], atol=1e-4)


@pytest.mark.parametrize("task", list(Task))
def test_empty_history_is_finite(ranker, task):
    x = inputs(task)
    x["history"] = torch.zeros(3, 1, dtype=torch.int64)
    x["history_lengths"] = torch.zeros(3, dtype=torch.int64)
    ctx = out(ranker, **x)
    assert torch.isfinite(ctx).all() and torch.isfinite(ranker.score(ctx)).all()
    # A 0-length row equals the same row with extra padded width.
    wide = dict(x, history=torch.zeros(3, 6, dtype=torch.int64))
    torch.testing.assert_close(out(ranker, **wide), ctx, rtol=0, atol=1e-6)


def test_empty_history_during_training_has_finite_gradients():
    model = make_ranker(seed=2).train()
    x = inputs(Task.PREQUERY)
    x["history_lengths"] = torch.zeros(3, dtype=torch.int64)
    model(**x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_out_of_range_ids_map_to_oov(ranker):
    x = inputs(Task.SEARCH)
    oov_item = NUM_ITEMS + 1
    ref = dict(x, history=x["history"].clone(), query=x["query"].clone())
    ref["history"][0, :2] = oov_item
    ref["query"][0, :2] = OOV_TOKEN_ID
    bad = dict(x, history=x["history"].clone(), query=x["query"].clone())
    bad["history"][0, :2] = torch.tensor([10 ** 9, -5])
    bad["query"][0, :2] = torch.tensor([10 ** 9, -3])
    torch.testing.assert_close(out(ranker, **bad), out(ranker, **ref), rtol=0, atol=1e-6)
    s = inputs(Task.SIMILAR)
    bad_source = out(ranker, **dict(s, source_item=torch.tensor([10 ** 9, -1, NUM_ITEMS + 1])))
    oov_source = out(ranker, **dict(s, source_item=torch.full((3,), oov_item)))
    torch.testing.assert_close(bad_source, oov_source, rtol=0, atol=1e-6)
    with torch.no_grad():
        scores = ranker.score(bad_source, torch.tensor([[1, 10 ** 9, -7]] * 3))
        ref_scores = ranker.score(bad_source, torch.tensor([[1, oov_item, oov_item]] * 3))
    torch.testing.assert_close(scores, ref_scores)


def test_history_longer_than_max_history_keeps_the_newest(ranker):
    long_hist = torch.arange(1, 21).unsqueeze(0)  # 20 > MAX_HIST = 12
    x = inputs(Task.PREQUERY, b=1)
    full = out(ranker, **dict(x, history=long_hist, history_lengths=torch.tensor([20])))
    tail = out(ranker, **dict(x, history=long_hist[:, -MAX_HIST:], history_lengths=torch.tensor([MAX_HIST])))
    torch.testing.assert_close(full, tail, rtol=0, atol=1e-6)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_to_plain_gives_the_same_scores(similarity):
    model = make_ranker(seed=4, similarity=similarity, temperature=0.1 if similarity == "cosine" else 1.0)
    plain = model.to_plain()
    assert not any(isinstance(m, EmbeddingTables) for m in plain.modules())  # one constant item table
    for task in Task:
        x = inputs(task, seed=7)
        with torch.no_grad():
            a, b = model.score(model(**x)), plain.score(plain(**x))
            cand = torch.tensor([[3, 1, 2, 10 ** 6]] * 3)
            ca, cb = model.score(model(**x), cand), plain.score(plain(**x), cand)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-5)
    # the copy is independent: the original model still has its embedding tables
    assert any(isinstance(m, EmbeddingTables) for m in model.modules())


def _mask(lengths, num_prefix, seq_len):
    try:  # the mask moved to the attention kernel's reference (num_prefix per row)
        from unirank.kernels.attention.reference import prefix_causal_mask
        return prefix_causal_mask(lengths, torch.full_like(lengths, num_prefix), seq_len)
    except ImportError:
        from unirank.model.ranker import prefix_causal_mask
        return prefix_causal_mask(lengths, num_prefix, seq_len).squeeze(1)


def test_prefix_causal_mask_hand_case():
    mask = _mask(torch.tensor([5, 3]), 2, 5).to(torch.int64)
    expected_full = [[1, 1, 0, 0, 0],  # TASK sees the prefix only (bidirectional prefix)
                     [1, 1, 0, 0, 0],  # CONTEXT likewise
                     [1, 1, 1, 0, 0],  # h_1 sees prefix + itself
                     [1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1]]
    assert mask[0].tolist() == expected_full
    # length 3: the valid rows 0..2 never see keys >= 3
    assert mask[1, :3].tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_causal_filter_hand_case():
    from unirank.model.ranker import CausalFilter

    filt = CausalFilter(RankerConfig(num_items=NUM_ITEMS, num_attributes=NUM_ATTRS, num_words=NUM_WORDS, dim=2,
                                     num_heads=1, filter_mix=0.5))
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]]])
    with torch.no_grad():
        torch.testing.assert_close(filt(x), x)  # high = 1 at init: the identity
        filt.high.zero_()  # the low pass alone, decay 0.5: weights 1, (0.5, 1), (0.25, 0.5, 1), normalized
        low = filt(x)
    expected = torch.tensor([[[1.0, 2.0], [(0.5 + 3) / 1.5, 1.0 / 1.5], [(0.25 + 1.5 + 5) / 1.75, (0.5 + 4) / 1.75]]])
    torch.testing.assert_close(low, expected)
    with torch.no_grad():
        later = filt(torch.cat([x, torch.ones(1, 2, 2) * 9], dim=1))
    torch.testing.assert_close(later[:, :3], low)  # later positions never reach earlier ones


def test_filter_mix_exports_to_onnx_with_the_same_answers(tmp_path):
    from unirank.model.tokenizer import WordTokenizer
    from unirank.serving.metadata import ExportMetadata
    from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
    from unirank.serving.synthetic_requests import random_batches

    plain = make_ranker(seed=3, block="ligr", filter_mix=0.5).to_plain()
    with torch.no_grad():  # away from the identity, so that the filter matters
        for block in plain.blocks:
            block.filter.high.fill_(0.3)
            block.filter.decay_logit.normal_()
    export_onnx(plain, tmp_path, top_k=8, tokenizer=WordTokenizer([f"w{i}" for i in range(NUM_WORDS - 2)]))
    batches = random_batches(ExportMetadata.load(tmp_path / "export.json"), vocab_size=NUM_WORDS, requests=48, seed=0)
    assert parity_max_abs_diff(TopKRanker(plain, 8).eval(), onnx_session(tmp_path / "model.onnx"), batches) <= 1e-4


def test_task_heads_start_as_the_shared_model_and_each_changes_only_its_rows():
    ranker = make_ranker(block="ligr", task_heads=8)
    x = {k: torch.cat([inputs(t)[k] for t in Task]) for k in inputs(Task.SEARCH)}  # one batch, every task
    heads, ranker.task_heads = ranker.task_heads, None
    shared = out(ranker, **x)
    ranker.task_heads = heads
    torch.testing.assert_close(out(ranker, **x), shared)  # zero-initialised down projections
    with torch.no_grad():
        heads.down[int(Task.PREQUERY)].normal_()
    changed = out(ranker, **x)
    rows = (x["task"] == int(Task.PREQUERY))
    torch.testing.assert_close(changed[~rows], shared[~rows])
    assert (changed[rows] - shared[rows]).abs().max() > 1e-3


def test_task_heads_export_to_onnx_with_the_same_answers(tmp_path):
    from unirank.model.tokenizer import WordTokenizer
    from unirank.serving.metadata import ExportMetadata
    from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
    from unirank.serving.synthetic_requests import random_batches

    plain = with_live_heads(make_ranker(seed=3, block="ligr", task_heads=8), seed=1).to_plain()
    export_onnx(plain, tmp_path, top_k=8, tokenizer=WordTokenizer([f"w{i}" for i in range(NUM_WORDS - 2)]))
    batches = random_batches(ExportMetadata.load(tmp_path / "export.json"), vocab_size=NUM_WORDS, requests=48, seed=0)
    assert parity_max_abs_diff(TopKRanker(plain, 8).eval(), onnx_session(tmp_path / "model.onnx"), batches) <= 1e-4


def test_task_heads_refuse_a_negative_width():
    with pytest.raises(ValueError, match="model.task_heads"):
        make_ranker(task_heads=-1)
