"""The suggest task trained in the unified model on the synthetic data: opt-in by config, learned
(its loss falls), carried by the checkpoint (query texts), evaluated beside its baselines, and
without effect on the item tasks' loss terms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unirank.data.examples import TrainingExamples
from unirank.experiments.report import evaluate_checkpoint
from unirank.model.request import QueryTask, Task
from unirank.training.checkpoint import load_checkpoint
from unirank.config import ConfigError, load_config
from unirank.training.loss import item_frequencies, softmax_loss
from unirank.data.prepare import build_ranker, prepare, ranker_config
from unirank.training.train import train

TINY = ["data.synthetic.num_users=300", "data.synthetic.num_items=150", "model.dim=16", "model.max_history=10",
        "model.num_layers=1", "model.dropout=0.1", "train.batch_size=64", "train.max_epochs=4", "train.lr=0.005",
        "train.patience=10", "eval.num_bootstrap=50", "train.threads=1"]
ALL_TASKS = "train.tasks=[search,similar,prequery,suggest]"
WEIGHTS = {t: 1.0 for t in (*Task, QueryTask.SUGGEST)}


def config(tmp_path, *extra):
    return load_config(None, TINY + [f"train.out_dir={tmp_path / 'run'}", *extra])


def suggest_loss(ranker, prep, cfg, num_negatives=0) -> float:
    ranker.eval()
    examples = TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, seed=5, tasks=(QueryTask.SUGGEST,))
    freq, qfreq = item_frequencies(prep.split.train, prep.data.num_items), prep.queries.frequencies()
    with torch.no_grad():
        return float(np.mean([softmax_loss(ranker, b, num_negatives, freq, torch.Generator().manual_seed(0),
                                           {QueryTask.SUGGEST: 1.0}, query_freq=qfreq)[1][QueryTask.SUGGEST]
                              for b in examples.epoch()]))


def test_suggest_is_opt_in_and_three_weights_still_configure_the_item_tasks(tmp_path):
    assert "suggest" not in load_config(None, []).train.tasks
    assert prepare(config(tmp_path)).queries is None
    load_config(None, ["train.task_weights=[1.0,0.5,3.0]"])
    load_config(None, [ALL_TASKS, "train.task_weights=[1.0,0.5,3.0,0.0]"])
    with pytest.raises(ConfigError, match="task_weights"):
        load_config(None, ["train.task_weights=[1.0,0.5]"])


def test_only_a_run_that_trains_suggest_carries_the_query_catalogue(tmp_path):
    """An item-task twin prepared with the unified run's data (benchmark --twins) is the model it
    would be without suggest: no catalogue, the three-row task table."""
    prep = prepare(config(tmp_path, ALL_TASKS))
    twin = config(tmp_path, "train.tasks=[prequery]")
    assert ranker_config(twin, prep).num_queries == 0
    torch.manual_seed(0)
    ranker = build_ranker(twin, prep)
    assert ranker.task_embedding.num_embeddings == 3 and not hasattr(ranker, "query_tokens")
    torch.manual_seed(0)
    unified = build_ranker(config(tmp_path, ALL_TASKS), prep)
    assert unified.task_embedding.num_embeddings == 4 and unified.query_tokens.shape[0] == len(prep.queries) + 2


@pytest.mark.parametrize("num_negatives", [0, 40])
def test_unified_training_learns_suggest_and_the_checkpoint_serves_it(tmp_path, num_negatives):
    cfg = config(tmp_path, ALL_TASKS, f"train.num_negatives={num_negatives}")
    prep = prepare(cfg)
    assert len(prep.queries) > 40
    torch.manual_seed(cfg.train.seed)
    before = suggest_loss(build_ranker(cfg, prep), prep, cfg)
    assert before == pytest.approx(np.log(len(prep.queries)), rel=0.1)  # ~uniform over the catalogue at init
    result = train(cfg, prep, quiet=True)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.query_texts == prep.queries.texts and loaded.ranker.config.num_queries == len(prep.queries)
    assert suggest_loss(loaded.ranker, prep, cfg) < before - 0.3
    assert "suggest/ndcg@10" in result.best_validation
    results = evaluate_checkpoint(cfg, result.checkpoint, prep)["results"]
    assert set(results["suggest"]) == {"unirank", "popular-queries", "last-item-queries"}
    assert set(results) >= {"search", "similar", "prequery", "suggest"}
    assert 0.5 < results["suggest"]["unirank"]["query_coverage"] <= 1.0


def test_suggest_rows_leave_the_item_tasks_loss_terms_unchanged(tmp_path):
    """The same batch with and without its suggest rows: every item task's loss sum is identical,
    on the full and the sampled softmax."""
    cfg = config(tmp_path, ALL_TASKS)
    prep = prepare(cfg)
    torch.manual_seed(0)
    ranker = build_ranker(cfg, prep).eval()
    tasks = (*Task, QueryTask.SUGGEST)
    batch = next(TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, seed=1, tasks=tasks).epoch())
    items_only = next(TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, seed=1, tasks=tuple(Task)).epoch())
    assert (batch.request.task == QueryTask.SUGGEST).any()
    freq = item_frequencies(prep.split.train, prep.data.num_items)
    for negatives in (0, 40):
        with torch.no_grad():
            _, mixed = softmax_loss(ranker, batch, negatives, freq, torch.Generator().manual_seed(3), WEIGHTS,
                                    query_freq=prep.queries.frequencies())
            _, alone = softmax_loss(ranker, items_only, negatives, freq, torch.Generator().manual_seed(3),
                                    {t: 1.0 for t in Task})
        for t in Task:
            torch.testing.assert_close(mixed[t], alone[t], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(mixed[QueryTask.SUGGEST])
