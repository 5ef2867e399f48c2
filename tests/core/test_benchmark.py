"""`unirank benchmark` end to end on the synthetic dataset: 2 seeds, each in its own out_dir, the
checkpoint chosen on validation, one test read per run, baselines, JSON + Markdown + plots."""
from __future__ import annotations

import json

import pytest

from unirank.cli.main import main
from unirank.training.checkpoint import CheckpointError

SMALL = ["data.synthetic.num_users=150", "data.synthetic.num_items=80", "model.dim=16", "model.num_layers=1",
         "model.max_history=10", "train.max_epochs=2", "train.seed=0", "eval.num_bootstrap=20"]


def run(tmp_path, *extra):
    return main(["benchmark", "--data", "synthetic", "--config", "quickstart", "--seeds", "2", "--eval-every", "1",
                 "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "report" / "bench"), "--quiet",
                 *extra, *SMALL])


def test_benchmark_two_seeds(tmp_path):
    assert run(tmp_path) == 0
    report = json.loads((tmp_path / "report" / "bench.json").read_text())
    assert report["seeds"] == [0, 1]
    assert [r["out_dir"] for r in report["runs"]] == [str(tmp_path / "runs" / f"seed-{s}") for s in (0, 1)]
    for r in report["runs"]:
        assert r["test_reads"] == 1
        assert r["validation_rounds"] == [1, 2]
        # the test read is of the checkpoint validation chose
        assert r["trained_epoch"] == r["selected_epoch"]
        best = max(r["history"], key=lambda row: row["score"])
        assert r["selected_epoch"] == best["epoch"]
    assert report["num_validation_users"] == 150  # all validation users, not the config's subset
    board = report["leaderboard"]
    assert {"search", "similar", "prequery"} <= set(board)
    assert {"unirank (quickstart)", "popularity", "bm25", "bm25-names"} <= set(board["search"])
    assert "item-knn" in board["similar"]
    cell = board["prequery"]["unirank (quickstart)"]["ndcg@10"]
    assert cell["n"] == 2 and len(cell["values"]) == 2 and cell["min"] <= cell["mean"] <= cell["max"]
    for name in ("bench.md", "bench_tasks.png", "bench_validation.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "± " in (tmp_path / "report" / "bench.md").read_text()


def test_benchmark_twins_one_seed(tmp_path):
    code = main(["benchmark", "--data", "synthetic", "--config", "quickstart", "--seeds", "1", "--twins",
                 "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "bench"), "--quiet",
                 *SMALL, "train.max_epochs=1"])
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    twins = report["runs"][0]["twins"]
    assert set(twins) == {"search", "similar", "prequery"}
    for task, twin in twins.items():
        assert twin["test_reads"] == 1 and twin["out_dir"].endswith(f"seed-0/single-{task}")
        assert task in twin["test"]
    assert "unirank (quickstart) single-task" in report["leaderboard"]["similar"]
    delta = report["alignment"]["prequery"]["ndcg@10"]
    unified = report["runs"][0]["test"]["prequery"]["ndcg@10"]["mean"]
    assert delta["mean"] == pytest.approx(unified - twins["prequery"]["test"]["prequery"]["ndcg@10"]["mean"])
    assert "Alignment tax" in (tmp_path / "bench.md").read_text()


def test_benchmark_refuses_a_used_out_dir(tmp_path):
    (tmp_path / "runs" / "seed-0").mkdir(parents=True)
    assert main(["train", "--config", "quickstart", "--quiet", f"train.out_dir={tmp_path / 'runs' / 'seed-0'}",
                 *SMALL, "train.max_epochs=1"]) == 0
    with pytest.raises(CheckpointError, match="finished run|already holds"):
        from unirank.experiments.benchmark import run_benchmark
        run_benchmark("synthetic", "quickstart", seeds=1, out=tmp_path / "runs", overrides=SMALL)


def test_benchmark_reads_a_finished_run_of_its_config_without_training_again(tmp_path):
    """Runs trained apart (`unirank train` with the benchmark's settings, e.g. seeds in parallel)
    are read by `unirank benchmark`: no training, one test read."""
    out = tmp_path / "runs" / "seed-0"
    assert main(["train", "--config", "quickstart", "--quiet", "data.path=synthetic", f"train.out_dir={out}",
                 "train.eval_users=null", *SMALL]) == 0
    best = (out / "best.pt").stat().st_mtime_ns
    from unirank.experiments.benchmark import run_benchmark
    report = run_benchmark("synthetic", "quickstart", seeds=1, out=tmp_path / "runs", overrides=SMALL)
    run = report["runs"][0]
    assert (out / "best.pt").stat().st_mtime_ns == best and run["test_reads"] == 1
    trained = json.loads((out / "train_result.json").read_text())
    assert run["selected_epoch"] == trained["best_epoch"] and run["history"] == trained["history"]
