"""Distillation from trained rankers (train.distill_from): the loss is the cross-entropy against the
teachers' ensemble distribution, a student equal to its teacher gets no gradient from it, the weight
mixes it with the usual loss, and teachers that cannot teach this run are refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from unirank.model.request import Task
from unirank.training.checkpoint import CheckpointError, load_checkpoint
from unirank.config import ConfigError, load_config
from unirank.training.distill import Teachers, load_teachers
from unirank.training.loss import softmax_loss
from unirank.data.prepare import build_ranker, prepare
from unirank.training.train import train

from test_training import TINY, first_batch, tiny_config

WEIGHTS = {t: 1.0 for t in Task}


def distill_loss(student, teachers, batch, freq, **kwargs):
    return softmax_loss(student, batch, 0, freq, torch.Generator().manual_seed(0), WEIGHTS, teachers=teachers,
                        **kwargs)[0]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_loss_is_the_cross_entropy_against_the_teachers_geometric_mean(tmp_path, temperature):
    """Teachers.loss on observed positions = T^2 * (KL(target || student at T) + H(target)), where
    target = softmax(mean of the teachers' log-softmax / T), with the student's -inf columns left out
    of every distribution; each teacher scores with its own metric and temperature."""
    cfg, prep, student, batch, _ = first_batch(tmp_path)
    rankers = []
    for seed, teacher_cfg in ((1, cfg), (2, tiny_config(tmp_path, "model.similarity=cosine", "model.temperature=0.1"))):
        torch.manual_seed(seed)
        rankers.append(build_ranker(teacher_cfg, prep))  # a dot-product and a cosine teacher
    teachers = Teachers(rankers, weight=1.0, temperature=temperature)
    req = batch.request
    keep = batch.targets[:, : req.history.shape[1] + 1] > 0
    hidden = student.encode(req.task, req.history, req.history_lengths, req.query, req.query_lengths,
                            req.source_item)[0]
    keep = keep[:, : hidden.shape[1] - 1]
    teachers.observe(req, keep)
    items = student.all_item_embeddings()[1: student.num_items + 1]
    logits = student.similarity(hidden[:, 1:][keep], items)
    logits[:, 0] = -torch.inf  # an excluded item
    got = teachers.loss(logits, slice(0, len(logits)))

    parts = []
    for r in rankers:
        h = r.encode(req.task, req.history, req.history_lengths, req.query, req.query_lengths, req.source_item)[0]
        t = r.similarity(h[:, 1:][keep], r.all_item_embeddings()[1: r.num_items + 1])
        parts.append(torch.log_softmax(t[:, 1:], dim=1))
    target = torch.softmax(torch.stack(parts).mean(0) / temperature, dim=1)
    student_log = torch.log_softmax(logits[:, 1:] / temperature, dim=1)
    kl = F.kl_div(student_log, target, reduction="none").sum(1)
    entropy = -(target * target.log()).sum(1)
    assert len(got) == int(keep.sum()) > 0
    torch.testing.assert_close(got, temperature ** 2 * (kl + entropy), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_student_equal_to_its_teacher_gets_no_gradient(tmp_path, temperature):
    """Weight 1, student = a copy of the teacher: the student's softmax already is the target, so the
    gradient vanishes (with an excluded item, which both sides must leave out
    alike); a different student gets a gradient."""
    cfg, prep, teacher, batch, freq = first_batch(tmp_path)
    student = copy.deepcopy(teacher)
    teachers = Teachers([teacher], weight=1.0, temperature=temperature)
    excluded = torch.tensor([3, 7])
    loss = distill_loss(student, teachers, batch, freq, excluded_items=excluded)
    grads = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad], allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-5
    torch.manual_seed(5)
    other = build_ranker(cfg, prep).eval()
    loss = distill_loss(other, teachers, batch, freq, excluded_items=excluded)
    grads = torch.autograd.grad(loss, [p for p in other.parameters() if p.requires_grad], allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) > 1e-3


def test_the_weight_mixes_the_target_loss_and_the_teachers_loss(tmp_path):
    cfg, prep, teacher, batch, freq = first_batch(tmp_path)
    torch.manual_seed(5)
    student = build_ranker(cfg, prep).eval()
    plain = distill_loss(student, None, batch, freq)
    only_teachers = distill_loss(student, Teachers([teacher], 1.0, 1.0), batch, freq)
    mixed = distill_loss(student, Teachers([teacher], 0.3, 1.0), batch, freq)
    assert not torch.isclose(plain, only_teachers)
    torch.testing.assert_close(mixed, 0.7 * plain + 0.3 * only_teachers, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="full softmax"):
        softmax_loss(student, batch, 20, freq, torch.Generator(), WEIGHTS, teachers=Teachers([teacher], 0.5, 1.0))


def test_a_run_distils_from_finished_runs_and_refuses_teachers_that_cannot_teach_it(tmp_path):
    teacher = train(tiny_config(tmp_path, "train.max_epochs=1", f"train.out_dir={tmp_path / 'teacher'}"),
                    quiet=True)
    student = train(tiny_config(tmp_path, "train.max_epochs=1", f"train.distill_from=[{tmp_path / 'teacher'}]",
                                f"train.out_dir={tmp_path / 'student'}"), quiet=True)
    assert load_checkpoint(student.checkpoint).metadata["epoch"] == 1
    assert str(tmp_path / "teacher") in (tmp_path / "student" / "config.yaml").read_text()

    cfg = tiny_config(tmp_path)
    prep = prepare(cfg)
    common = dict(fingerprint=prep.data.fingerprint(), num_items=prep.data.num_items,
                  tokenizer_state=prep.tokenizer.to_dict(), max_history=cfg.model.max_history)
    assert len(load_teachers([str(teacher.checkpoint)], 0.5, 1.0, **common).rankers) == 1
    with pytest.raises(CheckpointError, match="other data"):
        load_teachers([str(teacher.checkpoint)], 0.5, 1.0, **{**common, "fingerprint": "another"})
    with pytest.raises(CheckpointError, match="max_history"):
        load_teachers([str(teacher.checkpoint)], 0.5, 1.0, **{**common, "max_history": 11})
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_teachers([str(teacher.checkpoint)], 0.5, 1.0, **{**common, "tokenizer_state": {}})
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        load_teachers([str(tmp_path / "missing")], 0.5, 1.0, **common)
    other_data = ["data.synthetic.num_items=120"]
    with pytest.raises(CheckpointError, match="other data"):
        train(tiny_config(tmp_path, *other_data, f"train.distill_from=[{tmp_path / 'teacher'}]",
                          f"train.out_dir={tmp_path / 'refused'}"), quiet=True)
    assert not (tmp_path / "refused").exists()
    for bad in (["train.distill_weight=0"], ["train.distill_temperature=0"],
                ["train.distill_from=[x]", "train.num_negatives=20"],
                ["train.distill_from=[runs/t]", "train.out_dir=runs/t"]):
        with pytest.raises(ConfigError, match="distill"):
            load_config(None, TINY + bad)
