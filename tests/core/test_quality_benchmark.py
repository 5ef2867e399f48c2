"""benchmarks/quality.py: time to quality, bad input and ensembles; one slow
end-to-end run of a real rectools SASRec (needs .venv-peers: `make peers`). The peers' metrics and
split are tested with unirank.experiments.peers (test_peers.py)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from core_data import REPO
from unirank.experiments.peers import PeerInputError, peers_python

SPEC = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(quality)

# ---------------------------------------------------------------- time to quality


def test_seconds_to_reach_reads_the_first_crossing():
    curve = [[10, 0.01, 0.02], [20, 0.03, 0.07], [30, 0.04, 0.065], [40, 0.05, 0.08]]
    reach = quality.seconds_to_reach(curve, {"a": 0.0605, "b": 0.0788, "c": 0.0928})
    assert reach == {"a": 20, "b": 40, "c": None}


# ---------------------------------------------------------------- bad input


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        quality.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_missing_dataset_dir_is_named(capsys, tmp_path):
    err = _error(capsys, ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "q.json"), "--no-ours",
                          "--peers", ""])
    assert "no such dataset directory" in err and "nope" in err


def test_unknown_peer_is_named_with_the_known_ones(capsys, tmp_path):
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "q.json"), "--peers", "sasrec,gru4rec"])
    assert "unknown peer gru4rec" in err and "sasrec, bert4rec" in err


def test_merge_needs_an_existing_report_and_ours_run_a_directory(capsys, tmp_path):
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "q.json"), "--peers", "", "--merge"])
    assert "does not exist yet" in err
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "q.json"), "--peers", "",
                          "--ours-run", str(tmp_path / "run")])
    assert "--ours-run" in err and "no such directory" in err


def test_reuse_peers_needs_the_work_dir(capsys, tmp_path):
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "q.json"), "--peers", "sasrec",
                          "--reuse-peers"])
    assert "--reuse-peers needs --work-dir" in err


def test_nothing_to_run_is_refused(capsys, tmp_path):
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "q.json"), "--peers", "", "--no-ours"])
    assert "nothing to run" in err


def test_a_bad_override_of_ours_is_refused_before_any_training(capsys, tmp_path):
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "q.json"), "--peers", "",
                          "--ours-set", "train.eval_evry=1"])
    assert "--ours-set" in err and "eval_evry" in err
    err = _error(capsys, ["--data", "synthetic", "--out", str(tmp_path / "q.json"), "--peers", "", "--no-ours",
                          "--ours-set", "train.eval_every=1"])
    assert "--ours-set applies to the model trained here" in err
    assert not (tmp_path / "q.json").exists()


def test_ours_run_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(quality.BenchmarkInputError, match="best.pt"):
        quality.ours_report(tmp_path, "synthetic", 0)


def test_several_ours_runs_are_one_ensemble_and_a_run_with_itself_ranks_as_the_run(tmp_path):
    """--ours-run a b: one ensemble entry with test and validation metrics for every task; a run
    ensembled with itself ranks exactly as the run alone (the mean log-softmax is monotone in its
    scores), and runs of another width combine (each run loads with its own config)."""
    from unirank.config import load_config
    from unirank.training.train import train

    tiny = ["data.synthetic.num_users=200", "data.synthetic.num_items=120", "model.max_history=10",
            "model.num_layers=1", "train.batch_size=64", "train.max_epochs=2", "train.lr=0.005",
            "eval.num_bootstrap=0", "train.threads=1"]
    runs = []
    for name, dim in (("a", 16), ("b", 24)):
        train(load_config(None, tiny + [f"model.dim={dim}", f"train.out_dir={tmp_path / name}"]), quiet=True)
        runs.append(str(tmp_path / name))
    out = tmp_path / "q.json"
    quality.main(["--data", "synthetic", "--out", str(out), "--peers", "", "--num-bootstrap", "0",
                  "--ours-run", runs[0], "--ours-name", "a"])
    quality.main(["--data", "synthetic", "--out", str(out), "--peers", "", "--num-bootstrap", "0", "--merge",
                  "--ours-run", runs[0], runs[0], "--ours-name", "a+a"])
    quality.main(["--data", "synthetic", "--out", str(out), "--peers", "", "--num-bootstrap", "0", "--merge",
                  "--ours-run", *runs, "--ours-name", "a+b"])
    models = json.loads(out.read_text())["models"]
    assert models["a+b"]["kind"] == "ours-ensemble" and models["a+b"]["runs"] == runs
    for task in quality.TASKS:
        single, twice = models["a"]["tasks"][task]["test"], models["a+a"]["tasks"][task]["test"]
        for metric in ("recall@10", "ndcg@10", "mrr"):
            assert twice[metric]["mean"] == pytest.approx(single[metric]["mean"], abs=1e-9), (task, metric)
        assert 0.0 < models["a+b"]["tasks"][task]["test"]["ndcg@10"]["mean"] < 1.0
        assert "recall@10" in models["a+b"]["tasks"][task]["validation"]
    with pytest.raises(ValueError, match="at least 2"):
        from unirank.evaluation.evaluate import EnsembleScorer
        EnsembleScorer([])


def has_peers_python() -> bool:
    try:
        return bool(peers_python())
    except PeerInputError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not has_peers_python(), reason="no .venv-peers (run `make peers`)")
def test_sasrec_one_epoch_on_synthetic_data(tmp_path):
    out, plot, work = tmp_path / "q.json", tmp_path / "q.png", tmp_path / "work"
    argv = ["--data", "synthetic", "--out", str(out), "--peers", "sasrec", "--peer-max-epochs", "1", "--no-ours",
            "--num-bootstrap", "10", "--work-dir", str(work)]
    quality.main(argv + ["--plot", str(plot)])
    report = json.loads(out.read_text())
    sasrec = report["models"]["sasrec"]
    assert sasrec["epochs"] == 1 and sasrec["settings"]["torch_threads"] == 1
    assert "not_applicable" in sasrec["tasks"]["search"]
    for task in ("prequery", "similar"):
        test = sasrec["tasks"][task]["test"]
        assert 0 <= test["recall@10"]["mean"] <= test["recall@20"]["mean"] <= 1
        assert test["num_users"] == report["num_users"] and "mrr@20" in test
        assert len(sasrec["tasks"][task]["validation_curve"]) == 1
    assert plot.stat().st_size > 0
    # Re-reporting from the kept lists gives the same numbers and records the reuse.
    quality.main(argv + ["--reuse-peers", "--merge"])
    again = json.loads(out.read_text())
    assert again["models"]["sasrec"]["tasks"] == sasrec["tasks"]
    assert [r["peers_reused_from_work_dir"] for r in again["runs"]] == [False, True]
