"""LM features inside the ranker: word-piece tokenizer, the in-model sentence encoder (parity with
the caching TextEncoder), semantic-ID tables and text vectors in the item tower, checkpoints that
carry them, the cold-start catalogue mask and the cold-start run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_data import random_lm_features
from unirank.model.catalogue import Catalogue

from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import Task
from unirank.model.text_encoder import SentenceEncoder, TextEncoder
from unirank.model.tokenizer import WordPieceTokenizer, tokenizer_from_dict
from unirank.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unirank.config import load_config
from unirank.data.examples import pad

QUERIES = ["hair care styling tools", "makeup", "nail polish red", "skin care face moisturizers"]
N, DIM, TEXT_DIM = 40, 16, 8
SID_SIZES = [4, 4, 3]


@pytest.fixture(scope="module")
def wordpiece() -> WordPieceTokenizer:
    return WordPieceTokenizer()


@pytest.fixture(scope="module")
def sentence_encoder() -> SentenceEncoder:
    return SentenceEncoder()


def test_wordpiece_tokenizer_round_trip_and_errors(wordpiece):
    ids = wordpiece.encode("Hair Care, Styling-Tools")
    assert 0 not in ids and wordpiece.hf.cls_token_id not in ids  # no special tokens
    assert wordpiece.words_of(ids) == ["hair", "care", "styling", "tools"]
    assert wordpiece.encode("hair hair care", unique=True) == wordpiece.encode("hair care")
    assert len(wordpiece.encode("a b c d e f", max_length=3)) == 3
    assert wordpiece.encode("   ") == []
    assert tokenizer_from_dict(wordpiece.to_dict()).vocab_sha256 == wordpiece.vocab_sha256
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        tokenizer_from_dict({"type": "wordpiece", "vocab_sha256": "0" * 64})
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer_from_dict({"type": "bpe"})


def test_sentence_encoder_matches_text_encoder(wordpiece, sentence_encoder):
    """The graph's own [CLS]/[SEP] framing gives the same vectors as the HF tokenizer's."""
    ids, lengths = pad([np.array(wordpiece.encode(q)) for q in QUERIES])
    expected = torch.from_numpy(TextEncoder().encode(QUERIES))
    got = sentence_encoder.encode(ids, lengths)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    # memoised forward: same values, one entry per distinct query
    sentence_encoder._memo.clear()
    twice = sentence_encoder(torch.cat([ids, ids]), torch.cat([lengths, lengths]))
    torch.testing.assert_close(twice, torch.cat([expected, expected]), atol=2e-5, rtol=0)
    assert len(sentence_encoder._memo) == len(QUERIES)
    assert not any(p.requires_grad for p in sentence_encoder.parameters())


def lm_ranker(seed: int = 0, **overrides) -> tuple[UnifiedRanker, torch.Tensor, torch.Tensor]:
    codes, text = random_lm_features(N, SID_SIZES, TEXT_DIM, seed)
    cfg = RankerConfig(num_items=N, num_attributes=4, num_words=20, dim=DIM, num_heads=2, max_history=6,
                       text_features=True, text_dim=TEXT_DIM, semantic_id_sizes=SID_SIZES, **overrides)
    words = [[]] + [[2 + i % 5] for i in range(N)]
    return UnifiedRanker(cfg, Catalogue([[]] * (N + 1), words, item_codes=codes, item_text=text)).eval(), codes, text


def test_item_tower_adds_semantic_ids_and_text():
    ranker, codes, text = lm_ranker()
    tower = ranker.item_tower
    assert {f"sid_{i}" for i in range(len(SID_SIZES))} <= set(tower.ebc.embedding_bags)
    with torch.no_grad():
        base = tower.all_items().clone()
        assert torch.count_nonzero(base[0]) == 0  # padding
        tower.ebc.embedding_bags["sid_0"].weight[codes[5, 0]] += 1.0
        moved = tower.all_items()
    changed = (moved - base).abs().sum(1) > 0
    assert torch.equal(changed, torch.cat([torch.tensor([False]), codes[1: N + 1, 0] == codes[5, 0], torch.tensor([False])]))
    with torch.no_grad():
        tower.item_text[7] += 1.0
        assert not torch.allclose(tower.all_items()[7], moved[7])


def test_checkpoint_carries_lm_buffers(tmp_path, wordpiece):
    ranker, codes, text = lm_ranker()
    path = tmp_path / "lm.pt"
    catalogue = Catalogue([[]] * (N + 1), [[]] + [[2 + i % 5] for i in range(N)], tokenizer=wordpiece.to_dict())
    save_checkpoint(path, ranker, catalogue, "", {})
    loaded = load_checkpoint(path, expect=ranker.config)
    assert torch.equal(loaded.ranker.item_tower.item_codes, codes)
    assert torch.equal(loaded.ranker.item_tower.item_text, text)
    assert isinstance(loaded.tokenizer, WordPieceTokenizer)
    torch.testing.assert_close(loaded.ranker.all_item_embeddings(), ranker.all_item_embeddings())
    other = lm_ranker()[0].config
    other.semantic_id_sizes = [4, 4, 5]
    with pytest.raises(CheckpointError, match="semantic_id_sizes"):
        load_checkpoint(path, expect=other)


def test_frozen_query_encoder_in_search_context(wordpiece):
    cfg = dict(tokenizer="wordpiece", query_encoder="frozen", query_bag=False)
    torch.manual_seed(0)
    base = RankerConfig(num_items=N, num_attributes=4, num_words=wordpiece.vocab_size, dim=DIM, num_heads=2,
                        max_history=6, **cfg)
    ranker = UnifiedRanker(base, Catalogue([[]] * (N + 1), [[]] * (N + 1))).eval()
    ids, lengths = pad([np.array(wordpiece.encode(q)) for q in QUERIES[:2]] + [np.zeros(0)] * 2)
    task = torch.tensor([Task.SEARCH, Task.SEARCH, Task.PREQUERY, Task.SEARCH])
    zeros = torch.zeros(4, 1, dtype=torch.int64)
    ctx = ranker(task, zeros, torch.zeros(4, dtype=torch.int64), ids, lengths, torch.zeros(4, dtype=torch.int64))
    assert not torch.allclose(ctx[0], ctx[1])  # different queries, different contexts
    plain = ranker.to_plain()
    assert plain.query_encoder.memoize is False
    torch.testing.assert_close(plain(task, zeros, torch.zeros(4, dtype=torch.int64), ids, lengths,
                                     torch.zeros(4, dtype=torch.int64)), ctx, atol=1e-5, rtol=0)
    no_search = torch.tensor([Task.PREQUERY, Task.SIMILAR, Task.PREQUERY, Task.PREQUERY])  # the encoder gets 0 rows
    expected = ranker(no_search, zeros, torch.zeros(4, dtype=torch.int64), ids, lengths, torch.ones(4, dtype=torch.int64))
    torch.testing.assert_close(plain(no_search, zeros, torch.zeros(4, dtype=torch.int64), ids, lengths,
                                     torch.ones(4, dtype=torch.int64)), expected, atol=1e-5, rtol=0)
    ranker.train()
    assert not ranker.query_encoder.bert.training  # frozen encoder: no dropout in training either
    with pytest.raises(ValueError, match="wordpiece"):
        RankerConfig(num_items=N, num_attributes=4, num_words=20, query_encoder="frozen")


def test_excluded_items_are_never_negatives(tmp_path):
    from unirank.data.examples import TrainingExamples
    from unirank.training.loss import item_frequencies, softmax_loss
    from unirank.data.prepare import build_ranker, prepare

    cfg = load_config(None, ["data.synthetic.num_users=60", "data.synthetic.num_items=200", "model.dim=8",
                             "model.num_heads=1", "model.num_layers=1", f"train.out_dir={tmp_path}"])
    prep = prepare(cfg)
    ranker = build_ranker(cfg, prep)
    batch = next(TrainingExamples(prep.split, prep.builder, 32, 0).epoch())
    targets = set(batch.targets[batch.targets > 0].tolist())
    excluded = torch.tensor(sorted(set(range(1, 201)) - targets)[:5], dtype=torch.int64)
    assert len(excluded) == 5
    freq = item_frequencies(prep.split.train, 200)
    weight = ranker.item_tower.ebc.embedding_bags["item_id"].weight
    for negatives in (0, 20):
        ranker.zero_grad()
        loss, _ = softmax_loss(ranker, batch, negatives, freq, torch.Generator().manual_seed(0),
                               {t: 1.0 for t in Task}, excluded_items=excluded)
        loss.backward()
        assert torch.count_nonzero(weight.grad[excluded]) == 0
        assert torch.count_nonzero(weight.grad) > 0


def test_cold_start_run_on_synthetic(tmp_path):
    from unirank.experiments.cold_start import run_cold_start

    cfg = load_config("quickstart", [f"train.out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                                     "train.max_epochs=2", "train.tasks=[prequery]", "model.text_features=true",
                                     "model.semantic_id_levels=2", "eval.num_bootstrap=20", "train.threads=1"])
    report = run_cold_start(cfg, fraction=0.05, split_seed=0)
    assert report["num_cold_items"] == 20 and report["num_eval_users"] > 0
    results = report["metrics"]["prequery"]
    assert set(results) == {"unirank", "popularity", "text-knn"}
    assert results["popularity"]["recall@10"]["mean"] == 0.0  # a new item has no interactions
    for m in results.values():
        assert m["num_users"] == report["num_eval_users"]


def test_finetuned_encoder_gets_its_own_learning_rate(wordpiece):
    from unirank.training.train import parameter_groups

    cfg = load_config(None, ["model.tokenizer=wordpiece", "model.query_encoder=finetune", "train.encoder_lr=1e-5"])
    ranker = UnifiedRanker(RankerConfig(num_items=N, num_attributes=4, num_words=wordpiece.vocab_size, dim=DIM,
                                        num_heads=2, tokenizer="wordpiece", query_encoder="finetune"),
                           Catalogue([[]] * (N + 1), [[]] * (N + 1)))
    rest, encoder = parameter_groups(ranker, cfg)
    assert encoder["lr"] == 1e-5 and "lr" not in rest
    assert {id(p) for p in encoder["params"]} == {id(p) for p in ranker.query_encoder.parameters()}
    assert ranker.query_encoder.memoize is False
    ids, lengths = pad([np.array(wordpiece.encode(QUERIES[0]))])
    ranker.train()
    ctx = ranker(torch.tensor([Task.SEARCH]), torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                 ids, lengths, torch.zeros(1, dtype=torch.int64))
    ctx.sum().backward()
    assert ranker.query_encoder.bert.embeddings.word_embeddings.weight.grad is not None


def test_cold_start_evaluates_a_given_checkpoint(tmp_path):
    from dataclasses import replace

    from unirank.experiments.cold_start import fresh_boost_curve, run_cold_start

    cfg = load_config("quickstart", [f"train.out_dir={tmp_path}", "train.max_epochs=1", "train.tasks=[prequery]",
                                     "eval.num_bootstrap=0", "train.threads=1"])
    trained = run_cold_start(cfg, split_seed=1)
    again = run_cold_start(replace(cfg, eval=replace(cfg.eval, checkpoint=str(tmp_path / "best.pt"))), split_seed=1)
    assert again["metrics"] == trained["metrics"] and again["best_epoch"] == 1
    with pytest.raises(ValueError, match="not trained on this cold-start split"):
        run_cold_start(replace(cfg, eval=replace(cfg.eval, checkpoint=str(tmp_path / "best.pt"))), split_seed=2)
    # the same run at several fresh boosts: boost 0 is the run's own evaluation; a boost only moves the
    # fresh cold targets up (items above one after the boost were fresh and above it before)
    curve = fresh_boost_curve(replace(cfg, eval=replace(cfg.eval, checkpoint=str(tmp_path / "best.pt"))),
                              [0.0, 0.5, 1000.0], split_seed=1)
    assert curve["num_fresh_items"] >= curve["num_cold_items"]
    points = curve["points"]
    assert points[0]["cold"]["prequery"] == trained["metrics"]["prequery"]["unirank"]
    assert curve["baselines"]["prequery"]["text-knn"] == trained["metrics"]["prequery"]["text-knn"]
    recalls = [p["cold"]["prequery"]["recall@10"]["mean"] for p in points]
    assert recalls == sorted(recalls) and recalls[-1] > recalls[0]
    assert points[0]["warm_validation_score"] == pytest.approx(points[0]["warm_validation"]["prequery"]["ndcg@10"]["mean"])


def test_id_dropout_only_in_training():
    ranker, _, _ = lm_ranker(id_dropout=0.5)
    tower = ranker.item_tower
    with torch.no_grad():
        tower.ebc.embedding_bags["item_id"].weight.mul_(100.0)  # make the id part unmistakable
        torch.testing.assert_close(tower.all_items(), tower.all_items())  # eval: deterministic, ids kept
        full = tower.all_items()
        tower.train()
        dropped = (tower.all_items() - full).abs().sum(1)[1: N + 1] > 1.0
    assert 0.2 < dropped.float().mean() < 0.8  # about half the items lost their id vector
    with pytest.raises(ValueError, match="id_dropout"):
        RankerConfig(num_items=N, num_attributes=4, num_words=20, id_dropout=1.0)


def test_tied_text_projection_puts_queries_and_items_in_one_space(wordpiece, sentence_encoder):
    """tie_text_projection: one Linear projects the query vector and every item's text vector, so a
    query's projection is nearest the item whose content says the same thing, before any training."""
    texts = ["nail polish red lacquer", "hair shampoo conditioner", "face moisturizer cream", "eyeliner pencil"]
    text = torch.zeros(len(texts) + 2, sentence_encoder.dim)
    ids, lengths = pad([np.array(wordpiece.encode(t)) for t in texts])
    text[1: len(texts) + 1] = sentence_encoder(ids, lengths)
    cfg = RankerConfig(num_items=len(texts), num_attributes=2, num_words=wordpiece.vocab_size, dim=64, num_heads=2,
                       tokenizer="wordpiece", query_encoder="frozen", text_features=True,
                       text_dim=sentence_encoder.dim, tie_text_projection=True)
    torch.manual_seed(0)
    ranker = UnifiedRanker(cfg, Catalogue([[]] * (len(texts) + 1), [[]] * (len(texts) + 1), item_text=text)).eval()
    assert ranker.query_proj is ranker.item_tower.text_proj
    assert sum(n.startswith("query_proj") for n, _ in ranker.named_parameters()) == 0  # one parameter, not two
    proj = ranker.item_tower.text_proj
    with torch.no_grad():
        torch.nn.init.orthogonal_(proj.weight)  # an isometry on its row space: similarity survives
        q_ids, q_len = pad([np.array(wordpiece.encode(q)) for q in ["red nail polish", "shampoo for hair"]])
        scores = proj(sentence_encoder(q_ids, q_len)) @ proj(text[1: len(texts) + 1]).T
    assert scores.argmax(1).tolist() == [0, 1]
    with pytest.raises(ValueError, match="tie_text_projection"):
        RankerConfig(num_items=4, num_attributes=2, num_words=20, tokenizer="wordpiece", query_encoder="frozen",
                     tie_text_projection=True)
