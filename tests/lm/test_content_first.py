"""Content-first item vectors (`model.content_distill`): the content part of an item's vector (text
projection, attribute / word bags, semantic-ID rows) is trained towards the item's full vector, so
an item with no id row (a new item, `ItemTower.content_vectors`, the export path of new items) is
scored where a warm item with the same content is."""
from __future__ import annotations

import pytest
import torch

from lm_data import random_lm_features
from unirank.data.examples import TrainBatch
from unirank.model.catalogue import Catalogue
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import RankRequest, Task
from unirank.training.loss import content_distillation, softmax_loss

N, DIM, TEXT_DIM, HISTORY = 30, 16, 8, 5
SID_SIZES = [4, 3]


def content_ranker(content_distill: float, seed: int = 0) -> tuple[UnifiedRanker, list, list, torch.Tensor, torch.Tensor]:
    """Every item has its own content word, one shared attribute, random text and semantic IDs."""
    codes, text = random_lm_features(N, SID_SIZES, TEXT_DIM, seed)
    attributes = [[]] + [[i % 3] for i in range(N)]
    words = [[]] + [[2 + i] for i in range(N)]
    cfg = RankerConfig(num_items=N, num_attributes=3, num_words=N + 2, dim=DIM, num_heads=2, num_layers=1,
                       max_history=HISTORY, text_features=True, text_dim=TEXT_DIM, semantic_id_sizes=SID_SIZES,
                       content_distill=content_distill)
    ranker = UnifiedRanker(cfg, Catalogue(attributes, words, item_codes=codes, item_text=text))
    return ranker, attributes, words, text, codes


def markov_batch(generator: torch.Generator, rows: int = 32) -> TrainBatch:
    """Pre-query rows of the walk item i -> i + 1 or i + 2 (mod N): items the model can learn."""
    start = torch.randint(0, N, (rows, 1), generator=generator)
    steps = torch.randint(1, 3, (rows, HISTORY + 1), generator=generator).cumsum(1)
    seq = (start + steps) % N + 1
    request = RankRequest(task=torch.full((rows,), int(Task.PREQUERY)), history=seq[:, :HISTORY],
                          history_lengths=torch.full((rows,), HISTORY), query=torch.zeros(rows, 1, dtype=torch.int64),
                          query_lengths=torch.zeros(rows, dtype=torch.int64), source_item=torch.zeros(rows, dtype=torch.int64))
    return TrainBatch(request, seq)


def train(ranker: UnifiedRanker, steps: int = 300) -> None:
    generator = torch.Generator().manual_seed(0)
    freq = torch.full((N + 2,), 1.0 / N)
    optimizer = torch.optim.Adam(ranker.parameters(), lr=0.03)
    ranker.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = softmax_loss(ranker, markov_batch(generator), 0, freq, generator, {Task.PREQUERY: 1.0})
        loss.backward()
        optimizer.step()
    ranker.eval()


def score_gaps(content_distill: float) -> tuple[float, float]:
    """(mean |score of a new item with item i's content - score of warm item i|, mean |score of a
    warm item|) over every item and the contexts of 32 pre-query requests, after training."""
    ranker, attributes, words, text, codes = content_ranker(content_distill)
    train(ranker)
    batch = markov_batch(torch.Generator().manual_seed(1))
    req = batch.request
    with torch.no_grad():
        context = ranker(req.task, req.history, req.history_lengths, req.query, req.query_lengths, req.source_item)
        warm = ranker.all_item_embeddings()[1: N + 1]
        new = ranker.item_tower.content_vectors(attributes[1:], words[1:], text[1: N + 1], codes[1: N + 1])
    warm_scores, new_scores = context @ warm.T, context @ new.T
    return float((new_scores - warm_scores).abs().mean()), float(warm_scores.abs().mean())


def test_new_item_scores_like_the_warm_item_with_its_content():
    gap, scale = score_gaps(content_distill=1.0)
    # bound: a new item's score is within 10% of the mean |score| of the warm items (measured: 4%)
    assert gap < 0.1 * scale, (gap, scale)
    gap_off, scale_off = score_gaps(content_distill=0.0)
    assert gap_off > 0.3 * scale_off, (gap_off, scale_off)  # measured: 39%; the id row carries the score


def test_content_part_is_the_vector_without_the_id_row():
    ranker, attributes, words, text, codes = content_ranker(1.0)
    tower, items = ranker.item_tower, torch.arange(1, N + 1)
    content, full = tower.content_and_full(items)
    torch.testing.assert_close(full, tower.all_items()[1: N + 1])
    torch.testing.assert_close(content, tower.content_vectors(attributes[1:], words[1:], text[1: N + 1], codes[1: N + 1]))
    (content.sum() + full.sum()).backward()
    id_grad = tower.id_table().grad
    assert torch.equal(id_grad[1: N + 1], torch.ones(N, DIM))  # the id rows: from the full vector only


def test_distillation_term_adds_to_the_task_loss_and_teaches_content_only():
    batch = markov_batch(torch.Generator().manual_seed(2))
    losses = {}
    for weight in (0.0, 2.0):
        ranker, *_ = content_ranker(weight)
        loss, per_task = softmax_loss(ranker, batch, 0, torch.full((N + 2,), 1.0 / N), torch.Generator().manual_seed(3),
                                      {Task.PREQUERY: 1.0})
        losses[weight] = (loss, per_task[Task.PREQUERY])
    distill = content_distillation(ranker, batch.targets[batch.targets > 0])
    assert float(distill.detach()) > 0
    torch.testing.assert_close(losses[2.0][0], losses[0.0][0] + 2.0 * distill)
    assert torch.equal(losses[2.0][1], losses[0.0][1])  # the reported cross-entropy is the task's alone
    ranker.zero_grad()
    distill.backward()
    assert torch.count_nonzero(ranker.item_tower.id_table().grad) == 0  # the full vector is a fixed teacher
    assert torch.count_nonzero(ranker.item_tower.text_proj.weight.grad) > 0
    with pytest.raises(ValueError, match="content_distill"):
        RankerConfig(num_items=N, num_attributes=3, num_words=20, content_distill=-1.0)


def test_a_forgotten_item_is_the_new_item_with_its_content():
    """Offline cold-start evaluation (experiments/cold_start.forget_item_ids) scores a held-out item
    exactly as `unirank export --new-items` serves an item with its metadata: no id row, the K-means
    codes of the text-nearest trained item (itself) and collision code 0 (serving/new_items.py)."""
    from unirank.experiments.cold_start import forget_item_ids
    from unirank.serving.new_items import _nearest_codes

    ranker, attributes, words, text, codes = content_ranker(0.0)
    tower = ranker.item_tower.eval()
    items = [3, 7, 12]
    codes_before = tower.item_codes[items].clone()
    forget_item_ids(ranker, torch.tensor(items).numpy())
    new_codes = _nearest_codes(tower, text, text[items])
    assert torch.equal(new_codes[:, :-1], codes_before[:, :-1]) and (new_codes[:, -1] == 0).all()
    with torch.no_grad():
        expected = tower.content_vectors([attributes[i] for i in items], [words[i] for i in items], text[items], new_codes)
        torch.testing.assert_close(tower.all_items()[items], expected)
