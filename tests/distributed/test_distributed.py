"""The one trainer on several ranks (torchrun + TorchRec DMP, CPU/gloo): 2 ranks == 1 process on the
quality recipe with the lexical match, fused model-parallel tables on 2 ranks == 1 rank, SIGKILL +
resume (one process and 2 ranks), resume on another world size, consolidation into the single-file
format, bad input."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _dist_helpers import MIXED_PLAN, QUALITY, TINY, env, result, run_train, train_cmd

LOSS_RTOL = 1e-5  # per-step global loss, 2 ranks vs 1 (float summation order only)
METRIC_ATOL = 1e-6  # validation recall/ndcg@10 per task and epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted reference runs."""
    base = tmp_path_factory.mktemp("ranks")
    out = {"base": base, **{name: base / name for name in ("one", "two", "fused1", "fused2")}}
    run_train(None, out["one"], *QUALITY)
    run_train(2, out["two"], *QUALITY)
    run_train(1, out["fused1"], "distributed.sparse_optimizer=adagrad")
    run_train(2, out["fused2"], *MIXED_PLAN)
    return out


def assert_same_run(a: dict, b: dict) -> None:
    la, lb = np.array(a["losses"]), np.array(b["losses"])
    assert la.shape == lb.shape and len(la) > 0
    np.testing.assert_allclose(lb, la, rtol=LOSS_RTOL)
    assert len(a["history"]) == len(b["history"]) > 0
    for ha, hb in zip(a["history"], b["history"]):
        for key, value in ha.items():
            if "/" in key or key == "score":
                assert abs(value - hb[key]) <= METRIC_ATOL, (key, value, hb[key])


def test_two_ranks_equal_one_process_on_the_quality_recipe(runs):
    one, two = result(runs["one"]), result(runs["two"])
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["plan"] is None
    assert {t: p["sharding_type"] for t, p in two["plan"].items()} == dict.fromkeys(("item_id", "attribute", "word"),
                                                                                     "data_parallel")
    assert_same_run(one, two)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    # rank 0 writes best.pt from its replica (every table is whole): it scores what the run validated
    assert _validation_score(runs["two"] / "best.pt", 2) == pytest.approx(two["best_score"], abs=METRIC_ATOL)


def _validation_score(checkpoint: Path, world_size: int) -> float:
    from unirank.training.checkpoint import load_checkpoint
    from unirank.config import load_config
    from unirank.model.request import TASK_BY_NAME
    from unirank.data.prepare import prepare
    from unirank.training.train import selection_score, validate

    cfg = load_config("quickstart", TINY)
    loaded = load_checkpoint(checkpoint)
    assert loaded.metadata["trained_world_size"] == world_size
    assert float(loaded.ranker.terms["lexical"].scale) != 1.0  # the lexical match's scale trained with the rest
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    return selection_score(validate(loaded.ranker, prepare(cfg), tasks, cfg))


def test_fused_model_parallel_tables_on_two_ranks_equal_one_rank(runs):
    one, two = result(runs["fused1"]), result(runs["fused2"])
    plan = two["plan"]
    assert plan["item_id"]["sharding_type"] == "table_column_wise" and plan["word"]["sharding_type"] == "column_wise"
    assert {s[-1] for s in plan["word"]["shards"]} == {0, 1}  # really split over both ranks
    assert plan["item_id"]["compute_kernel"] == "fused"
    assert_same_run(one, two)


def _kill_after_checkpoint(cmd: list[str], out: Path, step: int) -> None:
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() >= f"step-{step:08d}":
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, no clean-up
        proc.wait()
    assert not (out / "train_result.json").exists()


@pytest.mark.parametrize("nproc", [None, 2], ids=["one-process", "two-ranks"])
def test_sigkill_then_restart_ends_as_the_uninterrupted_run(runs, nproc):
    out = runs["base"] / f"killed-{nproc}"
    overrides = (*QUALITY, "train.checkpoint_every=3")
    _kill_after_checkpoint(train_cmd(nproc, out, *overrides), out, 6)
    run_train(nproc, out, *overrides)
    resumed = result(out)
    assert resumed["resumed_from"] and resumed["resumed_from"][0]["from_world_size"] == (nproc or 1)
    assert_same_run(result(runs["one" if nproc is None else "two"]), resumed)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_stop_on_two_ranks_resume_in_one_process(runs):
    """Training continues across a world-size change (2 ranks -> one process) and equals the 1-process run."""
    out = runs["base"] / "2to1"
    run_train(2, out, *QUALITY, "train.stop_after_steps=5")
    assert result(out)["stopped"] and result(out)["steps"] == 5
    run_train(None, out, *QUALITY)
    resumed = result(out)
    assert resumed["resumed_from"][0] == {"checkpoint": "step-00000005", "from_world_size": 2, "to_world_size": 1}
    assert_same_run(result(runs["one"]), resumed)


def test_a_finished_run_or_another_config_in_the_out_dir_is_refused(runs):
    proc = run_train(None, runs["one"], *QUALITY, check=False)
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr
    out = runs["base"] / "stopped"
    run_train(None, out, *QUALITY, "train.stop_after_steps=2")
    written = (out / "config.yaml").read_text()
    proc = run_train(None, out, *QUALITY, "train.lr=0.5", check=False)
    assert proc.returncode == 2 and "another config (train.lr: run=0.003 now=0.5)" in proc.stderr
    proc = run_train(None, out, *QUALITY, "train.resume=false", check=False)
    assert proc.returncode == 2 and "train.resume=false refuses" in proc.stderr
    assert (out / "config.yaml").read_text() == written


def test_consolidated_checkpoint_is_the_single_file_format(runs):
    from unirank.training.checkpoint import load_checkpoint
    from unirank.cli.main import main

    score = _validation_score(runs["fused2"] / "best.pt", 2)  # consolidated from the sharded tables
    assert abs(score - result(runs["fused2"])["best_score"]) <= METRIC_ATOL
    loaded = load_checkpoint(runs["fused2"] / "best.pt")
    out = runs["base"] / "offline.pt"  # the offline CLI path gives the same file content
    assert main(["consolidate", "--checkpoint", str(runs["fused2"] / "checkpoints"), "--out", str(out)]) == 0
    a, b = load_checkpoint(out).ranker.state_dict(), loaded.ranker.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_shard_and_uncommitted_checkpoints_are_refused(runs, tmp_path):
    from unirank.training import sharded_checkpoint as sc
    from unirank.training.checkpoint import CheckpointError

    src = sc.latest(runs["fused2"] / "checkpoints")
    root = tmp_path / "ckpts"
    shutil.copytree(src.parent, root)
    name = src.name
    (root / name / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="missing shard file __1_0.distcp"):
        sc.latest(root)
    with pytest.raises(CheckpointError, match="missing shard file"):
        sc.consolidate(root / name, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    (root / name / sc.COMMIT).unlink()  # a directory that never got its COMMIT marker is not a checkpoint
    with pytest.raises(CheckpointError, match="not committed"):
        sc.verify(root / name)
    (root / ".tmp-step-00000099").mkdir()  # half-written temp directories are removed at start
    assert [p.name for p in sc.remove_stale(root)] == [".tmp-step-00000099"]


def test_world_size_and_sharding_errors(tmp_path):
    proc = run_train(1, tmp_path / "ws", "distributed.expect_world_size=2", check=False)
    assert proc.returncode != 0 and "expect_world_size=2 but torchrun started 1 rank(s)" in proc.stderr
    from unirank.config import ConfigError, load_config
    from unirank.training.distributed import constraints

    cpu, tables = torch.device("cpu"), ["item_id", "attribute", "word"]
    cfg = load_config("quickstart", ["distributed.sparse_optimizer=adagrad",
                                     "distributed.tables.word.sharding_types=[row_wise]"])
    with pytest.raises(ConfigError, match="row_wise.*needs GPUs"):
        constraints(cfg, cpu, tables)
    cfg = load_config("quickstart", ["distributed.tables.word.sharding_types=[table_wise]"])
    with pytest.raises(ConfigError, match="needs a fused table optimizer"):  # adamw tables are data_parallel on CPU
        constraints(cfg, cpu, tables)
    assert constraints(cfg, torch.device("cuda"), tables)["word"].sharding_types == ["table_wise"]
    cfg = load_config("quickstart", ["distributed.tables.words.rows=10"])
    with pytest.raises(ConfigError, match="unknown table"):
        constraints(cfg, cpu, tables)
