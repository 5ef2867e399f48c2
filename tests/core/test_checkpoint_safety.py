"""Nothing the project loads can run code: a checkpoint file holding a pickle that would call a
function is refused with an error naming the file, and the function never runs."""
from __future__ import annotations

import pickle

import pytest
import torch

from unirank.training import sharded_checkpoint as sc
from unirank.training.checkpoint import CheckpointError, load_checkpoint
from unirank.config import load_config
from unirank.training.train import train

TINY = ["data.synthetic.num_users=200", "data.synthetic.num_items=100", "model.dim=16", "model.max_history=10",
        "model.num_layers=1", "train.batch_size=64", "train.max_epochs=2", "train.threads=1",
        "eval.num_bootstrap=20"]


class Payload:
    """Unpickling it calls open(marker, "w"): the file appears if a loader ran the pickle's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """(config overrides, committed checkpoint) of a run stopped after 2 steps: resumable."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    overrides = TINY + [f"train.out_dir={out}"]
    train(load_config(None, overrides + ["train.stop_after_steps=2"]), quiet=True)
    return overrides, sc.latest(out / "checkpoints")


def test_a_rank_state_that_would_run_code_is_refused_on_resume(stopped_run, tmp_path):
    overrides, checkpoint = stopped_run
    marker = tmp_path / "ran"
    rank_file = checkpoint / "rank0.pt"
    good = rank_file.read_bytes()
    torch.save({"torch": Payload(marker)}, rank_file)
    try:
        with pytest.raises(CheckpointError, match=r"rank0\.pt: not a readable rank state"):
            train(load_config(None, overrides), quiet=True)
    finally:
        rank_file.write_bytes(good)
    assert not marker.exists()


def test_a_checkpoint_index_that_would_run_code_is_refused(stopped_run, tmp_path):
    _, checkpoint = stopped_run
    marker = tmp_path / "ran"
    index = checkpoint / ".metadata"
    good = index.read_bytes()
    index.write_bytes(pickle.dumps(Payload(marker)))
    try:
        with pytest.raises(CheckpointError, match=r"step-00000002: unreadable DCP metadata .*open is not part of a checkpoint index"):
            sc.verify(checkpoint)
    finally:
        index.write_bytes(good)
    assert not marker.exists()
    assert sc.verify(checkpoint)["step"] == 2  # the real index still reads


def test_a_best_pt_that_would_run_code_is_refused(tmp_path):
    marker, best = tmp_path / "ran", tmp_path / "best.pt"
    torch.save({"format": "unirank", "state_dict": Payload(marker)}, best)
    with pytest.raises(CheckpointError, match=r"best\.pt: not a readable checkpoint \(UnpicklingError"):
        load_checkpoint(best)
    assert not marker.exists()
