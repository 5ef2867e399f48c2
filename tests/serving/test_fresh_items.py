"""Fresh items (model.fresh_boost): items with at most model.fresh_max_count training interactions
gain exactly the boost in offline evaluation, in the exported graph and for items added at export,
while the training loss never sees it; the boost changes at export without retraining, and a
catalogue written before training counts were kept still loads (no item is fresh)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unirank.cli.main import main as cli
from unirank.config import ConfigError, load_config
from unirank.data.prepare import build_catalogue, build_ranker, prepare, ranker_config
from unirank.evaluation.evaluate import ModelScorer
from unirank.model.catalogue import Catalogue, CatalogueError
from unirank.model.request import Task
from unirank.model.tokenizer import WordTokenizer
from unirank.serving.metadata import OUTPUT_NAMES, ExportMetadata
from unirank.serving.new_items import add_new_items
from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session, parity_max_abs_diff
from unirank.serving.synthetic_requests import random_batches
from unirank.training.checkpoint import load_checkpoint, save_checkpoint
from unirank.training.loss import item_frequencies, softmax_loss

OVERRIDES = ["data.synthetic.num_users=120", "data.synthetic.num_items=50", "model.dim=16", "model.max_history=8",
             "model.num_layers=1", "model.dropout=0.0"]
BOOST = 2.5


def _config(*extra):
    return load_config(None, OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def prepared():
    """The small synthetic data, fresh_max_count at the median training count (both sets non-empty)."""
    prep = prepare(_config())
    counts = np.bincount(np.concatenate(prep.split.train), minlength=prep.data.num_items + 2)
    max_count = int(np.median(counts[1: prep.data.num_items + 1]))
    fresh = np.zeros(prep.data.num_items + 2, dtype=bool)
    fresh[1: prep.data.num_items + 1] = counts[1: prep.data.num_items + 1] <= max_count
    assert 0 < fresh.sum() < prep.data.num_items
    return prep, max_count, torch.from_numpy(fresh)


def _pair(prep, max_count, boost=BOOST):
    """(ranker without the term, the same weights with fresh_boost=boost)."""
    torch.manual_seed(0)
    base = build_ranker(_config(), prep).eval()
    cfg = _config(f"model.fresh_boost={boost}", f"model.fresh_max_count={max_count}")
    boosted = build_ranker(cfg, prep).eval()
    boosted.load_state_dict(base.state_dict())
    return base, boosted


def test_the_term_is_built_only_when_the_boost_is_on(prepared):
    prep, max_count, _ = prepared
    base, boosted = _pair(prep, max_count)
    assert "fresh" not in base.terms and "fresh" in boosted.terms
    assert set(base.state_dict()) == set(boosted.state_dict())  # nothing learned, nothing saved


@pytest.mark.parametrize("task", [Task.SEARCH, Task.SIMILAR, Task.PREQUERY])
def test_fresh_items_gain_exactly_the_boost_and_the_others_nothing(prepared, task):
    prep, max_count, fresh = prepared
    base, boosted = _pair(prep, max_count)
    cases, rows = prep.split.valid, np.arange(10)
    request = prep.builder.build(task, cases.users[rows], [cases.histories[i] for i in rows], cases.targets[rows])
    with torch.no_grad():
        diff = ModelScorer(boosted).scores(task, request) - ModelScorer(base).scores(task, request)
    n = prep.data.num_items
    torch.testing.assert_close(diff[:, 1: n + 1], (BOOST * fresh.float())[1: n + 1].expand(len(rows), -1))
    # candidate ids: the same boost; ids outside the catalogue (padding, OOV, negative, too large) get none
    term = boosted.terms["fresh"]
    candidates = torch.tensor([[1, 2, n, 0, n + 1, -3, n + 7]])
    view = boosted.view(*[torch.as_tensor(x)[:1] for x in (request.task, request.history, request.history_lengths,
                                                           request.query, request.query_lengths, request.source_item)])
    expected = BOOST * torch.tensor([[fresh[1], fresh[2], fresh[n], 0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(term.scores(view, candidates), expected)


def test_the_training_loss_is_the_same_with_boost_0_and_boost_5(prepared):
    from unirank.data.examples import TrainingExamples

    prep, max_count, _ = prepared
    base, boosted = _pair(prep, max_count, boost=5.0)
    batch = next(TrainingExamples(prep.split, prep.builder, 32, seed=0).epoch())
    freq = item_frequencies(prep.split.train, prep.data.num_items)
    weights = {Task.SEARCH: 1.0, Task.SIMILAR: 1.0, Task.PREQUERY: 1.0}
    for negatives in (0, 8):
        losses = []
        for ranker in (base, boosted):
            ranker.train()
            loss, per_task = softmax_loss(ranker, batch, negatives, freq, torch.Generator().manual_seed(0), weights)
            losses.append((float(loss.detach()), {t: float(v) for t, v in per_task.items()}))
        assert losses[0] == losses[1]


def test_the_graph_answers_with_the_boost_and_shows_fresh_items_first(prepared, tmp_path):
    prep, max_count, fresh = prepared
    base, _ = _pair(prep, max_count)
    _, boosted = _pair(prep, max_count, boost=1000.0)  # above any vector score: fresh items come first
    plain = boosted.to_plain()
    export_onnx(plain, tmp_path, top_k=5, tokenizer=WordTokenizer(["a", "b"]))
    batches = random_batches(ExportMetadata.load(tmp_path / "export.json"), vocab_size=4, requests=48, seed=0)
    session = onnx_session(tmp_path / "model.onnx")
    assert parity_max_abs_diff(TopKRanker(plain, 5).eval(), session, batches) <= 1e-4
    assert parity_max_abs_diff(TopKRanker(base.to_plain(), 5).eval(), session, batches) > 1.0
    tops = []
    for feed in batches:  # every row (all candidates, or a candidate list): its fresh items before the others
        ids, scores = session.run(OUTPUT_NAMES, feed)
        for row_ids, row_scores in zip(ids, scores):
            order = fresh[torch.from_numpy(row_ids[np.isfinite(row_scores)])].int()
            assert (order[:-1] >= order[1:]).all()
            tops += order[:1].tolist()
    assert sum(tops) > len(tops) / 2


def test_a_checkpoint_is_evaluated_and_exported_at_another_boost_without_retraining(prepared, tmp_path, capsys):
    prep, max_count, fresh = prepared
    cfg = _config()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt.pt", build_ranker(cfg, prep).eval(), build_catalogue(cfg, prep), "{}", metadata={})
    expect = ranker_config(_config("model.fresh_boost=1.5", f"model.fresh_max_count={max_count}"), prep)
    loaded = load_checkpoint(tmp_path / "ckpt.pt", expect=expect)  # the caller's inference settings
    torch.testing.assert_close(loaded.ranker.terms["fresh"].bonus, 1.5 * fresh.float())
    new = tmp_path / "new.jsonl"
    new.write_text('{"id": "new-1", "title": "kaqu lomi", "attributes": []}\n')
    assert cli(["export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "out"),
                "--new-items", str(new), "--fresh-boost", "3", "--fresh-max-count", str(max_count),
                "--top-k", "5"]) == 0
    assert '"parity_max_abs_diff"' in capsys.readouterr().out
    # what the export served: the trained fresh items and the new item (count 0) gain 3, OOV nothing
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert "fresh" not in loaded.ranker.terms
    loaded.ranker.set_inference_settings(loaded.catalogue.item_counts, fresh_boost=3.0, fresh_max_count=max_count)
    plain = loaded.ranker.to_plain().eval()
    add_new_items(loaded, plain, new)
    n, term = prep.data.num_items, plain.terms["fresh"]
    assert int(term.counts[n + 1]) == 0 and float(term.bonus[n + 1]) == 3.0 and float(term.bonus[n + 2]) == 0.0
    torch.testing.assert_close(term.bonus[: n + 1], 3.0 * fresh[: n + 1].float())
    assert cli(["export", "--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "bad"),
                "--fresh-boost", "nan"]) == 2
    assert "model.fresh_boost must be a finite number" in capsys.readouterr().err


def test_a_catalogue_without_training_counts_loads_and_has_no_fresh_item(prepared, tmp_path):
    prep, max_count, _ = prepared
    cfg = _config("model.fresh_boost=2.0", f"model.fresh_max_count={max_count}")
    catalogue = build_catalogue(cfg, prep)
    catalogue.save(tmp_path / "new.catalogue")
    assert torch.equal(Catalogue.load(tmp_path / "new.catalogue").item_counts, catalogue.item_counts)
    old = {k: v for k, v in catalogue.to_dict().items() if k != "item_counts"}
    torch.save(old, tmp_path / "old.catalogue")
    loaded = Catalogue.load(tmp_path / "old.catalogue")
    assert loaded.item_counts is None
    ranker = build_ranker(cfg, prep)
    ranker.set_inference_settings(loaded.item_counts, fresh_boost=2.0)
    assert float(ranker.terms["fresh"].bonus.abs().sum()) == 0.0
    with pytest.raises(CatalogueError, match="item_counts must be"):
        Catalogue.from_dict({**old, "item_counts": torch.zeros(3, dtype=torch.int64)}, "x")


@pytest.mark.parametrize("override,message", [("model.fresh_boost=nan", "model.fresh_boost must be a finite"),
                                              ("model.fresh_boost=inf", "model.fresh_boost must be a finite"),
                                              ("model.fresh_max_count=-1", "model.fresh_max_count must be >= 0")])
def test_bad_fresh_settings_name_the_key(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(None, [override])


def test_only_inference_settings_change_without_retraining(prepared):
    prep, max_count, _ = prepared
    ranker = copy.deepcopy(_pair(prep, max_count)[1])
    with pytest.raises(ValueError, match="not inference-only settings: \\['dim'\\]"):
        ranker.set_inference_settings(None, dim=8)
    ranker.set_inference_settings(None, fresh_boost=0.0)
    assert "fresh" not in ranker.terms and ranker.config.fresh_boost == 0.0
