"""A run's schedule sized by its data (training/schedule.py): a small dataset trains at least
train.min_steps updates, a large one keeps its epochs; validation rounds follow the run's length;
warm-up and cosine decay are relative to the run's steps; a run stopped mid-way resumes to the same
result with these keys set."""
from __future__ import annotations

import json

import pytest

from unirank.config import ConfigError, TrainConfig, load_config
from unirank.training.schedule import lr_factor, sized_schedule
from unirank.training.train import train

# synthetic data of 300 users in batches of 64: 5 optimizer steps per epoch
TINY = ["data.synthetic.num_users=300", "data.synthetic.num_items=150", "model.dim=16", "model.max_history=10",
        "model.num_layers=1", "model.dropout=0.1", "train.batch_size=64", "train.lr=0.005", "train.patience=10",
        "eval.num_bootstrap=20", "train.threads=1", "train.lr_schedule=cosine", "train.warmup_steps=3"]
# 2 epochs = 10 steps < min_steps: 5 epochs (25 steps), validated every max(1, ceil(5 / 2)) = 3 epochs and at the end
SIZED = ["train.max_epochs=2", "train.min_steps=23", "train.eval_every=1", "train.eval_rounds=2"]


def test_a_small_dataset_trains_at_least_min_steps_and_a_large_one_keeps_its_epochs():
    recipe = TrainConfig(max_epochs=9, min_steps=500, eval_every=9, eval_rounds=10)
    small, large = sized_schedule(recipe, 5), sized_schedule(recipe, 175)
    assert (small.epochs, small.total_steps, small.eval_every) == (100, 500, 10)
    assert [e for e in range(1, 101) if small.validates(e)] == list(range(10, 101, 10))
    assert (large.epochs, large.total_steps, large.eval_every) == (9, 1575, 9)
    assert [e for e in range(1, 10) if large.validates(e)] == [9]
    assert sized_schedule(recipe, 3).total_steps == 501  # whole epochs: 167 of 3 steps
    unsized = TrainConfig(max_epochs=9, eval_every=9)
    assert sized_schedule(unsized, 175) == large and sized_schedule(unsized, 5).epochs == 9


def test_eval_every_stays_the_finest_cadence_and_the_last_epoch_is_validated():
    every2 = sized_schedule(TrainConfig(max_epochs=7, eval_every=2), 10)
    assert [e for e in range(1, 8) if every2.validates(e)] == [2, 4, 6, 7]
    capped = sized_schedule(TrainConfig(max_epochs=40, eval_every=2, eval_rounds=8), 10)
    assert capped.eval_every == 5 and sum(capped.validates(e) for e in range(1, 41)) == 8
    finest = sized_schedule(TrainConfig(max_epochs=40, eval_every=8, eval_rounds=20), 10)
    assert finest.eval_every == 8


def test_warmup_and_cosine_are_relative_to_the_runs_steps():
    recipe = TrainConfig(max_epochs=2, min_steps=100, lr_schedule="cosine", warmup_steps=50, warmup_fraction=0.1)
    schedule = sized_schedule(recipe, 5)  # 20 epochs, 100 steps, warm-up 10 (warmup_steps gives way)
    factors = [lr_factor(s, schedule) for s in range(110)]
    assert schedule.warmup_steps == 10 and factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0)
    longer = sized_schedule(recipe, 1)  # a smaller batch: the same curve over 100 epochs of 1 step
    assert [lr_factor(s, longer) for s in range(110)] == factors


@pytest.mark.parametrize("bad", ["train.min_steps=-1", "train.eval_rounds=-2", "train.warmup_fraction=1.0"])
def test_bad_schedule_keys_are_refused_by_name(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
        load_config(None, [bad])


def test_the_fast_recipe_is_unchanged_at_amazon_beautys_size():
    """fast's floor and round count leave a 22k-user catalogue (175 steps per epoch) as it was:
    9 epochs, one validation round; a 610-user one (5 steps per epoch) trains 500 updates."""
    fast = load_config("fast").train
    as_before = TrainConfig(max_epochs=fast.max_epochs, eval_every=fast.eval_every,
                            warmup_steps=fast.warmup_steps, lr_schedule=fast.lr_schedule)
    assert sized_schedule(fast, 175) == sized_schedule(as_before, 175)
    assert sized_schedule(fast, 5).total_steps >= fast.min_steps


@pytest.fixture(scope="module")
def sized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sized") / "run"
    cfg = load_config(None, TINY + SIZED + [f"train.out_dir={out}"])
    result = train(cfg, quiet=True)
    return result, json.loads((out / "train_result.json").read_text())


def test_a_tiny_dataset_trains_min_steps_validated_at_the_sized_cadence(sized_run):
    result, saved = sized_run
    assert saved["schedule"]["steps_per_epoch"] == 5 and saved["schedule"]["epochs"] == 5
    assert saved["steps"] == 25 >= 23
    assert [row["epoch"] for row in result.history] == [3, 5]
    assert [row["step"] for row in result.history] == [15, 25]


def test_a_sized_run_stopped_mid_epoch_resumes_to_the_same_result(sized_run, tmp_path):
    _, uninterrupted = sized_run
    overrides = TINY + SIZED + [f"train.out_dir={tmp_path / 'run'}"]
    stopped = train(load_config(None, overrides + ["train.stop_after_steps=12"]), quiet=True)
    assert stopped.history == []  # stopped in epoch 3, before its validation round
    train(load_config(None, overrides), quiet=True)
    resumed = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert resumed["resumed_from"] and resumed["steps"] == 25
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-5)
    assert len(resumed["history"]) == len(uninterrupted["history"]) == 2
    for again, once in zip(resumed["history"], uninterrupted["history"]):
        assert {k: v for k, v in again.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in once.items() if k != "seconds"}, rel=1e-5)
