"""unirank.experiments.peers and `unirank benchmark --peers`: metrics from top-K lists, the split the
peers get, the peers' rows in the leaderboard, the refusal without the peers' python (before any
training); one slow run of the real rectools SASRec through `unirank benchmark --peers sasrec`
(needs .venv-peers: `make peers`, or UNIRANK_PEERS_PYTHON)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from unirank.cli.main import main
from unirank.data.examples import leave_one_out_split
from unirank.experiments import peers
from unirank.experiments.benchmark_report import leaderboard, markdown, plot_tasks

SMALL = ["data.synthetic.num_users=150", "data.synthetic.num_items=80", "model.dim=16", "model.num_layers=1",
         "model.max_history=10", "train.max_epochs=1", "train.seed=0", "eval.num_bootstrap=20"]

# ---------------------------------------------------------------- metrics from top-K lists


def test_ranks_are_list_positions_and_absent_targets_miss():
    lists = np.array([[5, 3, 9], [1, 2, 4], [7, -1, -1], [8, 6, 2]])
    ranks = peers.ranks_from_top_k(lists, np.array([3, 7, 7, 8]))
    assert ranks.tolist() == [1.0, np.inf, 0.0, 0.0]


def test_padding_never_matches():
    ranks = peers.ranks_from_top_k(np.array([[-1, -1], [4, -1]]), np.array([1, 5]))
    assert np.isinf(ranks).all()


def test_top_k_metrics_by_hand():
    # targets at positions 0, 4 and 12 of a top-20 list, and one miss
    lists = np.tile(np.arange(100, 120), (4, 1))
    targets = np.array([100, 104, 112, 7])
    m = peers.top_k_metrics(lists, targets, num_bootstrap=0)
    assert m["recall@5"]["mean"] == pytest.approx(2 / 4)
    assert m["recall@10"]["mean"] == pytest.approx(2 / 4)
    assert m["recall@20"]["mean"] == pytest.approx(3 / 4)
    assert m["ndcg@10"]["mean"] == pytest.approx((1 + 1 / np.log2(6)) / 4)
    assert m["ndcg@20"]["mean"] == pytest.approx((1 + 1 / np.log2(6) + 1 / np.log2(14)) / 4)
    assert "mrr" not in m and m["mrr@20"]["mean"] == pytest.approx((1 + 1 / 5 + 1 / 13) / 4)
    assert m["num_users"] == 4


def test_top_k_metrics_refuse_k_beyond_the_list():
    with pytest.raises(peers.PeerInputError, match="top-20"):
        peers.top_k_metrics(np.ones((2, 10), dtype=int), np.array([1, 2]))


def test_peer_lists_become_leaderboard_rows_beside_ours(tmp_path):
    """A peer's test.npz -> per-task metrics per seed -> one leaderboard row per task, mean and spread
    over seeds, search not applicable; the Markdown shows mrr@20 and n/a, the plot skips n/a."""
    targets = np.array([100, 104, 112, 7])
    runs = []
    for seed, shift in ((0, 0), (1, 1)):  # seed 1's lists are one place later: every hit drops a rank
        out = tmp_path / f"sasrec-seed-{seed}"
        out.mkdir()
        lists = np.tile(np.arange(100 - shift, 120 - shift), (4, 1))
        np.savez(out / "test.npz", prequery=lists, similar=lists[:, ::-1])
        runs.append({"seed": seed, "epochs": 3, "best_epoch": 2, "train_seconds": 1.0,
                     "test": peers.peer_test_metrics(out, targets, num_bootstrap=10)})
    ours = peers.top_k_metrics(np.tile(np.arange(100, 120), (4, 1)), targets, num_bootstrap=10)
    ours["mrr"] = ours.pop("mrr@20")
    board = leaderboard([{"test": {"search": ours, "prequery": ours}}], {}, "unirank (fast)", {"sasrec": runs})
    row = board["prequery"]["sasrec (rectools)"]
    assert row["ndcg@10"]["n"] == 2 and row["ndcg@10"]["values"][0] == pytest.approx((1 + 1 / np.log2(6)) / 4)
    assert row["ndcg@10"]["values"][1] == pytest.approx((1 / np.log2(3) + 1 / np.log2(7)) / 4)
    assert row["mrr@20"]["mean"] == pytest.approx(((1 + 1 / 5 + 1 / 13) + (1 / 2 + 1 / 6 + 1 / 14)) / 8)
    assert board["search"]["sasrec (rectools)"] == {"not_applicable": peers.PEER_SEARCH}
    report = {"dataset": "d", "config": "fast", "seeds": [0, 1], "selection": "s", "num_validation_users": 4,
              "num_test_users": 4, "run": {"command": "c", "commit": "x", "machine": "m"}, "leaderboard": board,
              "runs": [], "peers": {"sasrec": runs}, "peer_notes": list(peers.PEER_NOTES)}
    paths = {"tasks_png": tmp_path / "t.png", "validation_png": tmp_path / "v.png"}
    text = markdown(report, paths)
    assert "| search | sasrec (rectools) | n/a (no query input) |" in text
    assert "(mrr@20) | 2 |" in text and "| sasrec (rectools) | 1 | 3 | 2 | 1.0 |" in text
    plot_tasks(board, paths["tasks_png"])
    assert paths["tasks_png"].stat().st_size > 0


# ---------------------------------------------------------------- the split for the peers


def test_export_split_holds_training_rows_validation_targets_and_no_test_targets(tmp_path):
    split = leave_one_out_split([np.array([3, 1, 4, 1, 5]), np.array([9, 2]), np.array([2, 6, 5])])
    path = peers.export_split(split, np.array([1]), tmp_path / "split.npz")
    s = dict(np.load(path))
    assert set(s) == {"user", "train_user", "train_item", "train_position", "valid_target", "valid_position",
                      "valid_eval"}
    assert s["user"].tolist() == [0, 2]  # user 1 has < 3 interactions
    assert s["train_user"].tolist() == [0, 0, 0, 2]
    assert s["train_item"].tolist() == [3, 1, 4, 2]
    assert s["train_position"].tolist() == [0, 1, 2, 0]
    assert s["valid_target"].tolist() == [1, 6] and s["valid_position"].tolist() == [3, 1]
    assert s["valid_eval"].tolist() == [1]
    assert 5 not in s["valid_target"]  # both test targets are 5: the peer never sees them


def test_validation_subset_matches_the_trainer_draw():
    assert peers.validation_subset(10, None, 0).tolist() == list(range(10))
    assert peers.validation_subset(10, 50, 0).tolist() == list(range(10))
    sub = peers.validation_subset(1000, 100, 42)
    expected = np.sort(np.random.default_rng(42).choice(np.arange(1000), 100, replace=False))
    assert sub.tolist() == expected.tolist()


def test_the_peer_script_ships_inside_the_package():
    assert peers.PEER_SCRIPT.is_file() and peers.PEER_SCRIPT.parent.name == "experiments"


# ---------------------------------------------------------------- bad input, before any training


def benchmark(tmp_path, *extra) -> int:
    return main(["benchmark", "--data", "synthetic", "--config", "quickstart", "--seeds", "1",
                 "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "bench"), "--quiet", *extra, *SMALL])


def test_missing_peers_python_is_refused_naming_make_peers_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(peers.PYTHON_ENV, raising=False)
    missing = tmp_path / "no-venv" / "bin" / "python"
    assert benchmark(tmp_path, "--peers", "sasrec", "--peers-python", str(missing)) == 2
    err = capsys.readouterr().err
    assert "make peers" in err and str(missing) in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "bench.json").exists()
    monkeypatch.setenv(peers.PYTHON_ENV, str(missing))  # the environment variable is read the same way
    assert benchmark(tmp_path, "--peers", "sasrec") == 2
    assert "make peers" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_unknown_peer_and_a_zero_cap_are_refused(tmp_path, capsys):
    assert benchmark(tmp_path, "--peers", "sasrec,gru4rec") == 2
    assert "unknown peer gru4rec" in capsys.readouterr().err
    assert benchmark(tmp_path, "--peers", "sasrec", "--peer-minutes", "0") == 2
    assert "--peer-minutes must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- end to end (real rectools)


def has_peers_python() -> bool:
    try:
        return bool(peers.peers_python())
    except peers.PeerInputError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not has_peers_python(), reason="no .venv-peers (run `make peers`)")
def test_benchmark_with_a_real_sasrec_peer(tmp_path):
    """`unirank benchmark --peers sasrec`: the peer trained once per seed (seeded) on the same split,
    its rows beside ours for pre-query and similar-item, search not applicable."""
    assert benchmark(tmp_path, "--seeds", "2", "--peers", "sasrec", "--peer-minutes", "0.05") == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    runs = report["peers"]["sasrec"]
    assert [r["seed"] for r in runs] == report["seeds"] == [0, 1]
    assert [r["settings"]["seed"] for r in runs] == [0, 1] and all(r["epochs"] >= 1 for r in runs)
    board = report["leaderboard"]
    for task in ("prequery", "similar"):
        row = board[task]["sasrec (rectools)"]
        assert row["recall@10"]["n"] == 2 and 0 <= row["recall@10"]["mean"] <= row["recall@20"]["mean"] <= 1
        assert "mrr@20" in row and "mrr" not in row
        assert runs[0]["test"][task]["num_users"] == report["num_test_users"]
        assert "unirank (quickstart)" in board[task] and "popularity" in board[task]
    assert "not_applicable" in board["search"]["sasrec (rectools)"]
    text = (tmp_path / "bench.md").read_text()
    assert "| prequery | sasrec (rectools) |" in text and "n/a (no query input)" in text
