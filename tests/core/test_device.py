"""Every tensor the model, the training data path and the loss create is created on its inputs'
device: a TorchFunctionMode fails any factory call (arange, zeros, full, tensor, rand, ...) made from
unirank's own code without an explicit device, through a forward + backward of every feature."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from unirank.model.request import Task
from unirank.training.batches import step_inputs
from unirank.training.loss import step_loss

from test_training import first_batch

FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace}
ROOT = Path(__file__).resolve().parents[2] / "src" / "unirank"
CHECKED = [ROOT / "model", ROOT / "training" / "batches.py", ROOT / "training" / "loss.py",
           ROOT / "kernels"]


class RequireDevice(TorchFunctionMode):
    """Records factory calls without `device=` whose caller is a checked unirank file."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if any(caller == c or c in caller.parents for c in CHECKED):
                self.violations.append(f"{caller.relative_to(ROOT)}:{sys._getframe(1).f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("num_negatives", [0, 16])
def test_model_data_path_and_loss_create_tensors_on_their_inputs_device(tmp_path, num_negatives):
    cfg, prep, ranker, batch, freq = first_batch(tmp_path)
    ranker.train()
    ranker.item_tower.id_dropout = 0.3
    weights = {t: 1.0 for t in Task}
    mode = RequireDevice()
    with mode:
        inputs = step_inputs(ranker, batch, num_negatives=num_negatives, item_freq=freq,
                             generator=torch.Generator().manual_seed(0), rank=1, world=2, id_dropout_seed=7)
        loss, _ = step_loss(ranker, inputs, weights)
        loss.backward()
        ranker.eval()
        with torch.no_grad():
            req = batch.request
            ranker.score(ranker(req.task, req.history, req.history_lengths, req.query, req.query_lengths,
                                req.source_item))
            ranker.score(ranker(req.task, req.history, req.history_lengths, req.query, req.query_lengths,
                                req.source_item), torch.tensor([[1, 2, 3]] * req.batch_size))
    assert mode.violations == []


def test_the_mode_catches_a_factory_call_without_a_device():
    """The check itself can fail: code compiled as a model file that calls torch.arange without a
    device is recorded (with a device it is not)."""
    mode = RequireDevice()
    with mode:
        exec(compile("torch.arange(4); torch.arange(4, device='cpu')", str(ROOT / "model" / "ranker.py"), "exec"),
             {"torch": torch})
    assert mode.violations == ["model/ranker.py:1 arange"]
