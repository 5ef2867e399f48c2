"""Short end-to-end runs on the synthetic data: train -> checkpoint -> evaluate_checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unirank.training.train as train_module
from unirank.model.request import Task
from unirank.training.checkpoint import load_checkpoint
from unirank.config import ConfigError, load_config
from unirank.data.examples import TrainingExamples
from unirank.training.loss import item_frequencies, softmax_loss
from unirank.experiments.report import evaluate_checkpoint
from unirank.data.prepare import build_ranker, prepare, ranker_config
from unirank.training.train import train

TINY = ["data.synthetic.num_users=300", "data.synthetic.num_items=150", "model.dim=16", "model.max_history=10",
        "model.num_layers=1", "model.dropout=0.1", "train.batch_size=64", "train.max_epochs=4", "train.lr=0.005",
        "train.patience=10", "eval.num_bootstrap=50", "train.threads=1"]


def tiny_config(tmp_path, *extra: str):
    return load_config(None, TINY + [f"train.out_dir={tmp_path / 'run'}", *extra])


def first_batch(tmp_path):
    """(cfg, prep, an untrained ranker in eval mode, the first training batch of all tasks, item frequencies)."""
    cfg = tiny_config(tmp_path)
    prep = prepare(cfg)
    torch.manual_seed(0)
    ranker = build_ranker(cfg, prep).eval()
    batch = next(TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, seed=1).epoch())
    return cfg, prep, ranker, batch, item_frequencies(prep.split.train, prep.data.num_items)


@torch.no_grad()
def mean_loss(ranker, prep, cfg, tasks) -> float:
    """Full-softmax cross-entropy of `ranker` (eval mode), averaged over tasks and over one fixed epoch of
    training batches."""
    ranker.eval()
    examples = TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, seed=123, tasks=tasks)
    freq = item_frequencies(prep.split.train, prep.data.num_items)
    weights = {t: 1.0 for t in tasks}
    losses = [softmax_loss(ranker, b, 0, freq, torch.Generator().manual_seed(0), weights)[0].item() / len(tasks)
              for b in examples.epoch()]
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def unified_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("unified")
    cfg = tiny_config(tmp_path)
    prep = prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    initial = build_ranker(cfg, prep)  # train() seeds the same way: identical initial weights
    result = train(cfg, prep, quiet=True)
    report = evaluate_checkpoint(cfg, result.checkpoint, prep)
    return cfg, prep, initial, result, report


def test_training_lowers_the_loss(unified_run):
    cfg, prep, initial, result, _ = unified_run
    trained = load_checkpoint(result.checkpoint, expect=ranker_config(cfg, prep)).ranker
    before, after = mean_loss(initial, prep, cfg, tuple(Task)), mean_loss(trained, prep, cfg, tuple(Task))
    assert before == pytest.approx(np.log(prep.data.num_items), rel=0.1)  # ~uniform at init
    assert after < before - 0.3


def test_checkpoint_and_run_files(unified_run):
    cfg, prep, _, result, _ = unified_run
    out = result.checkpoint.parent
    assert result.checkpoint.is_file() and result.checkpoint.name == "best.pt"
    loaded = load_checkpoint(result.checkpoint, expect=ranker_config(cfg, prep))
    assert loaded.metadata["fingerprint"] == prep.data.fingerprint()
    assert loaded.metadata["epoch"] == result.best_epoch
    assert set(loaded.metadata["validation"]) == {"search", "similar", "prequery"}
    assert loaded.tokenizer.words == prep.tokenizer.words
    history = json.loads((out / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert (out / "config.yaml").is_file()
    # validation improved over training
    assert history[-1]["score"] > history[0]["score"] or result.best_epoch > 1


def test_test_metrics_for_all_tasks_and_beat_popularity(unified_run):
    _, prep, _, _, report = unified_run
    results = report["results"]
    assert set(results) == {"search", "similar", "prequery", "search_zero_shot"}
    assert set(results["search"]) == set(results["search_zero_shot"]) == {"unirank", "popularity", "bm25"}
    assert 0 < results["search_zero_shot"]["unirank"]["num_users"] < results["search"]["unirank"]["num_users"]
    assert set(results["similar"]) == {"unirank", "popularity", "item-knn"}
    for task, by_method in results.items():
        m = by_method["unirank"]
        assert m["num_users"] == len(prep.split.test) or task == "search_zero_shot"
        for key in ("recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr"):
            assert 0.0 <= m[key]["ci95"][0] <= m[key]["mean"] <= m[key]["ci95"][1] <= 1.0
    # The planted structure (sticky topics, follow-up items) is learnable in 4 epochs: on seeds 0-2
    # the model's pre-query NDCG@10 is ~2.5x popularity's; require 1.5x.
    pre = results["prequery"]
    assert pre["unirank"]["ndcg@10"]["mean"] > 1.5 * pre["popularity"]["ndcg@10"]["mean"]
    assert results["similar"]["unirank"]["ndcg@10"]["mean"] > results["similar"]["popularity"]["ndcg@10"]["mean"]
    assert results["search"]["unirank"]["ndcg@10"]["mean"] > results["search"]["popularity"]["ndcg@10"]["mean"]


def test_sampled_softmax_trains(tmp_path):
    cfg = tiny_config(tmp_path, "train.num_negatives=64", "train.max_epochs=3")
    prep = prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    initial = build_ranker(cfg, prep)
    result = train(cfg, prep, quiet=True)
    trained = load_checkpoint(result.checkpoint, expect=ranker_config(cfg, prep)).ranker
    assert mean_loss(trained, prep, cfg, tuple(Task)) < mean_loss(initial, prep, cfg, tuple(Task)) - 0.2


def test_single_task_mode_trains_only_that_task(tmp_path, monkeypatch):
    seen_tasks, seen_weights = set(), []
    real_loss = train_module.step_loss

    def spy(ranker, inputs, task_weights, **kwargs):
        seen_tasks.update(inputs.request.task.unique().tolist())
        seen_weights.append(set(task_weights))
        return real_loss(ranker, inputs, task_weights, **kwargs)

    monkeypatch.setattr(train_module, "step_loss", spy)
    cfg = tiny_config(tmp_path, "train.tasks=[prequery]", "train.max_epochs=2")
    result = train(cfg, quiet=True)
    assert seen_tasks == {int(Task.PREQUERY)}
    assert all(w == {Task.PREQUERY} for w in seen_weights)
    assert set(result.best_validation) == {"epoch", "step", "seconds", "score", "prequery/recall@10",
                                           "prequery/ndcg@10"}
    assert load_checkpoint(result.checkpoint).metadata["tasks"] == ["prequery"]


def test_lr_schedule_warmup_then_cosine_to_zero(tmp_path):
    from unirank.config import ConfigError
    from unirank.training.schedule import lr_factor, sized_schedule

    cfg = tiny_config(tmp_path, "train.lr_schedule=cosine", "train.warmup_steps=10", "train.max_epochs=11")
    schedule = sized_schedule(cfg.train, 10)  # 110 steps
    factors = [lr_factor(s, schedule) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # linear warm-up
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5)  # cosine midpoint
    assert factors[110] == pytest.approx(0.0) and factors[119] == pytest.approx(0.0)  # 0 after the horizon
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    constant = sized_schedule(tiny_config(tmp_path, "train.max_epochs=11").train, 10)
    assert {lr_factor(s, constant) for s in range(120)} == {1.0}
    with pytest.raises(ConfigError, match="lr_schedule"):
        tiny_config(tmp_path, "train.lr_schedule=linear")


def test_cosine_schedule_reaches_the_optimizer(tmp_path, monkeypatch):
    """The optimizer steps with the scheduled rate (recorded per step), ending near 0."""
    seen = []
    original = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    cfg = tiny_config(tmp_path, "train.lr_schedule=cosine", "train.max_epochs=2", "train.tasks=[prequery]")
    result = train(cfg, quiet=True)
    assert seen[0] == pytest.approx(cfg.train.lr) and seen[-1] < 0.05 * cfg.train.lr
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    assert load_checkpoint(result.checkpoint).optimizer_state  # loads weights-only: no numpy scalar in it


@pytest.mark.parametrize("num_negatives", [0, 32])
def test_the_ranks_shares_average_to_the_one_process_loss_and_gradient(tmp_path, num_negatives):
    """What DDP computes from W ranks' step_loss (the mean of their losses and gradients) is the one
    process's task-weighted loss of the global batch and its gradient, on both softmax paths."""
    from unirank.training.batches import step_inputs
    from unirank.training.loss import step_loss

    cfg, prep, ranker, batch, freq = first_batch(tmp_path)
    weights = {Task.SEARCH: 1.0, Task.SIMILAR: 0.5, Task.PREQUERY: 2.0}

    def loss_and_grad(rank, world):
        ranker.zero_grad(set_to_none=True)
        inputs = step_inputs(ranker, batch, num_negatives=num_negatives, item_freq=freq,
                             generator=torch.Generator().manual_seed(3), rank=rank, world=world)
        loss, sums = step_loss(ranker, inputs, weights)
        loss.backward()
        return loss.detach(), sums, [p.grad.clone() for p in ranker.parameters()]

    one, one_sums, one_grad = loss_and_grad(0, 1)
    shares = [loss_and_grad(rank, 3) for rank in range(3)]
    torch.testing.assert_close(sum(s[0] for s in shares) / 3, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(s[1] for s in shares), one_sums, rtol=1e-5, atol=1e-5)
    for k, g in enumerate(one_grad):
        torch.testing.assert_close(sum(s[2][k] for s in shares) / 3, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [4 * 7 * 3, 4 * 7 * 1000])  # 3 rows per chunk, one chunk
def test_chunked_full_softmax_matches_one_matrix(chunk_bytes):
    """The chunked cross-entropy has the values and gradients of F.cross_entropy on the whole matrix,
    excluded columns included."""
    from unirank.training.loss import full_softmax_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 4, generator=g, requires_grad=True)
    items = torch.randn(7, 4, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    excluded = torch.tensor([6])  # a column no label points to
    weights = torch.rand(10, generator=g)
    logits_of = lambda rows: h[rows] @ items.T  # noqa: E731
    chunked = full_softmax_cross_entropy(logits_of, len(h), 4 * len(items), labels, excluded,
                                         chunk_bytes=chunk_bytes)
    grads = torch.autograd.grad((chunked * weights).sum(), (h, items))
    logits = (h @ items.T).index_fill(1, excluded, -torch.inf)
    whole = F.cross_entropy(logits, labels, reduction="none")
    expected = torch.autograd.grad((whole * weights).sum(), (h, items))
    torch.testing.assert_close(chunked, whole)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def decay_only_step(tmp_path, *overrides: str):
    """(ranker after one AdamW step with zero gradients, {name: weight before}): lr 0.1, weight decay
    0.2, id-table decay 0.5, so every weight moves by its decoupled decay alone."""
    from unirank.training.train import make_optimizer

    cfg = tiny_config(tmp_path, "train.lr=0.1", "train.weight_decay=0.2", "train.id_weight_decay=0.5", *overrides)
    ranker = build_ranker(cfg, prepare(cfg))
    before = {name: p.detach().clone() for name, p in ranker.named_parameters()}
    optimizer = make_optimizer(ranker, cfg)
    for p in ranker.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return ranker, before


def test_id_weight_decay_sets_the_id_tables_decay(tmp_path):
    """train.id_weight_decay: the item-id table (named by UnifiedRanker.parameter_groups) shrinks by
    1 - lr * id_weight_decay, every other weight by 1 - lr * weight_decay."""
    ranker, before = decay_only_step(tmp_path)
    id_table = ranker.item_tower.id_table()
    assert ranker.parameter_groups()["item_ids"] == [id_table]
    for name, p in ranker.named_parameters():
        decay = 0.5 if p is id_table else 0.2
        torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * decay), msg=name)
    for bad in (["train.weight_decay=-0.1"], ["train.id_weight_decay=-1"]):
        with pytest.raises(ConfigError, match="weight_decay"):
            load_config(None, TINY + bad)


def test_init_from_continues_a_run_and_refuses_other_parameter_groups_leaving_the_run_as_it_was(tmp_path):
    """A resumed run continues at the next epoch. One whose optimizer groups differ from the
    checkpoint's (here: the id table given a decay of its own) gets a CheckpointError naming the
    options, before anything in its out_dir is written."""
    from unirank.training.checkpoint import CheckpointError

    first = train(tiny_config(tmp_path, "train.max_epochs=1", "train.weight_decay=0.1"), quiet=True)
    resumed = train(tiny_config(tmp_path, "train.max_epochs=2", "train.weight_decay=0.1",
                                f"train.init_from={first.checkpoint}", f"train.out_dir={tmp_path / 'resumed'}"),
                    quiet=True)
    assert [row["epoch"] for row in resumed.history] == [2]
    with pytest.raises(CheckpointError, match="id_weight_decay"):
        train(tiny_config(tmp_path, "train.max_epochs=2", "train.weight_decay=0.1", "train.id_weight_decay=0.5",
                          f"train.init_from={first.checkpoint}", f"train.out_dir={tmp_path / 'refused'}"), quiet=True)
    assert not (tmp_path / "refused").exists()
    assert load_checkpoint(first.checkpoint).metadata["epoch"] == 1
