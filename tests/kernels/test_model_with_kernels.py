"""The ranker trains with both kernels switched on (Triton interpreter on CPU) to the same losses
as with the reference paths (plain-torch attention, TorchRec EBC), from the same initial weights."""
from dataclasses import replace

import pytest
import torch

from unirank.model.catalogue import Catalogue

from unirank.model.ranker import UnifiedRanker
from unirank.config import load_config
from unirank.data.examples import TrainingExamples
from unirank.training.loss import item_frequencies, softmax_loss
from unirank.model.request import TASK_BY_NAME
from unirank.data.prepare import prepare, ranker_config


def _losses(ranker: UnifiedRanker, batches, prep, steps: int) -> list[float]:
    opt = torch.optim.Adam(ranker.parameters(), lr=1e-2)
    freq = item_frequencies(prep.split.train, prep.data.num_items)
    weights = {TASK_BY_NAME[t]: 1.0 for t in ("search", "similar", "prequery")}
    out = []
    for batch in batches[:steps]:
        loss, _ = softmax_loss(ranker, batch, 0, freq, torch.Generator().manual_seed(0), weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("steps", [3])
def test_kernels_train_to_reference_losses(steps):
    cfg = load_config("quickstart", ["data.synthetic.num_users=60", "data.synthetic.num_items=50",
                                     "model.dim=32", "model.num_heads=1", "model.dropout=0.0",
                                     "model.max_history=8", "train.batch_size=8"])
    prep = prepare(cfg)
    ref_cfg = ranker_config(cfg, prep)
    kernel_cfg = replace(ref_cfg, attention_impl="triton", embedding_bag_impl="triton")
    models = []
    for model_cfg in (ref_cfg, kernel_cfg):
        torch.manual_seed(0)
        models.append(UnifiedRanker(model_cfg, Catalogue(prep.data.item_attributes, prep.item_words)))
    reference, kernels = models
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, kernels.state_dict()[name]), name
    batches = list(TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, seed=0).epoch())
    ref_losses = _losses(reference, batches, prep, steps)
    kernel_losses = _losses(kernels, batches, prep, steps)
    assert ref_losses[-1] < ref_losses[0]  # it does train
    assert kernel_losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-4)
