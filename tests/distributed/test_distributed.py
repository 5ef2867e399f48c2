"""torchrun + TorchRec DMP on CPU/gloo: 2 ranks == 1 rank, SIGKILL + resume, resharding 2<->1,
consolidation into the single-file format, bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _dist_helpers import MIXED_PLAN, TINY, env, result, torchrun, torchrun_cmd


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted reference runs: 1 rank, and 2 ranks with a mixed TW/CW/TWCW plan."""
    base = tmp_path_factory.mktemp("dist")
    one, two = base / "one", base / "two"
    torchrun(1, one)
    torchrun(2, two, *MIXED_PLAN)
    return {"one": one, "two": two, "base": base}

LOSS_RTOL = 1e-5  # per-step global loss, 2 ranks vs 1 rank (float summation order only)
METRIC_ATOL = 1e-6  # validation recall/ndcg@10 per task and epoch


def assert_same_run(a: dict, b: dict) -> None:
    la, lb = np.array(a["losses"]), np.array(b["losses"])
    assert la.shape == lb.shape
    np.testing.assert_allclose(lb, la, rtol=LOSS_RTOL)
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        for key, value in ha.items():
            if "/" in key or key == "score":
                assert abs(value - hb[key]) <= METRIC_ATOL, (key, value, hb[key])


def test_two_ranks_equal_one_rank(runs):
    one, two = result(runs["one"]), result(runs["two"])
    assert one["world_size"] == 1 and two["world_size"] == 2
    plan = two["plan"]
    assert plan["item_id"]["sharding_type"] == "table_column_wise" and plan["word"]["sharding_type"] == "column_wise"
    assert {s[-1] for s in plan["word"]["shards"]} == {0, 1}  # really split over both ranks
    assert one["steps"] == two["steps"] > 0 and len(one["history"]) == 2
    assert_same_run(one, two)
    assert one["losses"][-1] < one["losses"][0]  # it trains


def test_sigkill_after_checkpoint_then_resume(runs):
    out = runs["base"] / "killed"
    cmd = torchrun_cmd(2, out, *MIXED_PLAN, "distributed.checkpoint_every=3")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "LATEST"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() >= "step-00000006":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, no clean-up
        proc.wait()
    assert not (out / "distributed_result.json").exists()
    torchrun(2, out, *MIXED_PLAN, "distributed.checkpoint_every=3")
    resumed = result(out)
    assert resumed["resumed_from"] and resumed["resumed_from"][0]["from_world_size"] == 2
    assert_same_run(result(runs["two"]), resumed)
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_stop_on_two_ranks_resume_on_one(runs):
    """Training continues across a world-size change (2 -> 1) and still equals the 1-rank run."""
    out = runs["base"] / "2to1"
    torchrun(2, out, *MIXED_PLAN, "distributed.stop_after_steps=5")
    assert result(out)["stopped"] and result(out)["steps"] == 5
    torchrun(1, out)
    resumed = result(out)
    assert resumed["resumed_from"][0] == {"checkpoint": "step-00000005", "from_world_size": 2, "to_world_size": 1}
    assert_same_run(result(runs["one"]), resumed)


def _eval_only(nproc: int, out: Path, *overrides: str) -> dict:
    proc = torchrun(nproc, out, *overrides, flags=("--eval-only",))
    line = [l for l in proc.stdout.splitlines() if l.startswith("{") and '"score"' in l][-1]
    return json.loads(line)


def test_load_two_rank_checkpoint_on_one_rank_and_reverse(runs):
    two, one = result(runs["two"]), result(runs["one"])
    on_one = _eval_only(1, runs["two"])  # saved by 2 ranks (mixed plan), loaded by 1
    assert on_one["step"] == two["steps"]
    assert abs(on_one["score"] - two["history"][-1]["score"]) <= METRIC_ATOL
    on_two = _eval_only(2, runs["one"], *MIXED_PLAN)  # saved by 1 rank, resharded onto 2
    assert abs(on_two["score"] - one["history"][-1]["score"]) <= METRIC_ATOL


def test_consolidated_checkpoint_is_the_single_file_format(runs):
    from unirank.training.checkpoint import load_checkpoint
    from unirank.training.config import load_config
    from unirank.training.train import TASK_BY_NAME, prepare, selection_score, validate

    cfg = load_config("quickstart", TINY)
    loaded = load_checkpoint(runs["two"] / "best.pt")
    assert loaded.metadata["trained_world_size"] == 2
    prep = prepare(cfg)
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    score = selection_score(validate(loaded.ranker, prep, tasks, cfg))
    assert abs(score - result(runs["two"])["best_score"]) <= METRIC_ATOL
    # the offline CLI path gives the same file content
    from unirank.training.distributed import main

    out = runs["base"] / "offline.pt"
    assert main(["--consolidate", str(runs["two"] / "checkpoints"), "--out", str(out)]) == 0
    a, b = load_checkpoint(out).ranker.state_dict(), loaded.ranker.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_shard_and_uncommitted_checkpoints_are_refused(runs, tmp_path):
    from unirank.training import sharded_checkpoint as sc
    from unirank.training.checkpoint import CheckpointError

    src = sc.latest(runs["two"] / "checkpoints")
    root = tmp_path / "ckpts"
    shutil.copytree(src.parent, root)
    name = src.name
    (root / name / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="missing shard file __1_0.distcp"):
        sc.latest(root)
    with pytest.raises(CheckpointError, match="missing shard file"):
        sc.consolidate(root / name, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    # a directory that never got its COMMIT marker is not a checkpoint
    (root / name / sc.COMMIT).unlink()
    with pytest.raises(CheckpointError, match="not committed"):
        sc.verify(root / name)
    # half-written temp directories are never read and are removed at start
    (root / ".tmp-step-00000099").mkdir()
    assert [p.name for p in sc.remove_stale(root)] == [".tmp-step-00000099"]


def test_world_size_mismatch_and_cpu_only_sharding_errors(runs, tmp_path):
    proc = torchrun(1, tmp_path / "ws", "distributed.expect_world_size=2", check=False)
    assert proc.returncode != 0
    assert "expect_world_size=2 but torchrun started 1 rank(s)" in proc.stderr
    from unirank.training.config import ConfigError, load_config
    from unirank.training.distributed import constraints

    cfg = load_config("quickstart", ["distributed.tables.word.sharding_types=[row_wise]"])
    with pytest.raises(ConfigError, match="row_wise.*needs GPUs"):
        constraints(cfg, torch.device("cpu"))
    cfg = load_config("quickstart", ["distributed.tables.words.rows=10"])
    with pytest.raises(ConfigError, match="unknown table"):
        constraints(cfg, torch.device("cpu"))
    from unirank.training.distributed import run
    with pytest.raises(ConfigError, match="single-process options"):  # refused before any process group
        run(load_config("quickstart", ["train.mask_seen=true"]))
    with pytest.raises(ConfigError, match="future_window"):
        run(load_config("quickstart", ["train.future_window=2", "train.future_weight=0.2"]))
    with pytest.raises(ConfigError, match="id_weight_decay"):
        run(load_config("quickstart", ["train.id_weight_decay=0.1"]))
    with pytest.raises(ConfigError, match="decay_norms_and_biases"):
        run(load_config("quickstart", ["train.decay_norms_and_biases=false"]))
    with pytest.raises(ConfigError, match="label_smoothing"):
        run(load_config("quickstart", ["train.label_smoothing=0.1"]))
    with pytest.raises(ConfigError, match="distill_from"):
        run(load_config("quickstart", ["train.distill_from=[runs/teacher]"]))
