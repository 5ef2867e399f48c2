"""Cold-start item split: items the model never trains on, evaluated as next-item targets.

Choices (deterministic given the seed):
- Eligible items are those that are the LAST item of at least one user's sequence with at least
  one earlier item, so every held-out ("cold") item is the test target of some user, exactly
  where the leave-one-out protocol puts its test target.
- `fraction` is a share of all distinct items in the sequences (rounded, at least 1), drawn
  uniformly from the eligible items; it is capped at the number of eligible items.
- Every interaction with a cold item is removed from every sequence (including histories of
  other users): the model sees no id, co-occurrence or position signal for a cold item, only its
  content. `train_sequences` keeps one (possibly shorter, possibly empty) list per user in the
  input order; run the usual leave-one-out split on it for warm training and validation.
- Evaluation cases are the users whose last item is cold: the history is their sequence before
  the target with cold items removed (the model could not have embedded them from ids either);
  users left with an empty history are dropped. Rank the full catalogue, cold items included.
- `run_cold_start` trains on the warm part with the cold items outside the training catalogue
  (masked from the softmax) and zeroes their id rows before evaluation: only content (attribute /
  word bags, semantic IDs, text vectors) can place them.
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import NamedTuple, Sequence

import numpy as np
import torch

from unirank.model.ranker import UnifiedRanker
from unirank.evaluation.baselines import Popularity, TextKNN
from unirank.training.checkpoint import load_checkpoint
from unirank.config import Config
from unirank.data.datasets import load_dataset
from unirank.evaluation.evaluate import ModelScorer, evaluate_all
from unirank.data.examples import EvalCases
from unirank.data.lm_features import item_lm_features
from unirank.model.request import TASK_BY_NAME
from unirank.data.prepare import prepare, ranker_config
from unirank.training.train import train


class ColdStartCase(NamedTuple):
    user_index: int  # position of the user in the input sequences
    history: list[int]  # items before the target, chronological, cold items removed
    target: int  # the cold item


class ColdStartSplit(NamedTuple):
    train_sequences: list[list[int]]  # per user, every cold item removed
    eval_cases: list[ColdStartCase]
    cold_items: list[int]  # sorted; no row of train_sequences contains any of them


def cold_start_split(sequences: Sequence[Sequence[int]], seed: int,
                     fraction: float = 0.05) -> ColdStartSplit:
    """Hold out ~`fraction` of the items (chosen among users' last items) as cold test targets."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    num_items = len({item for seq in sequences for item in seq})
    eligible = sorted({seq[-1] for seq in sequences if len(seq) >= 2})
    if not eligible:
        raise ValueError("no user sequence has 2+ items, so no item can be a cold test target")
    num_cold = min(len(eligible), max(1, round(fraction * num_items)))
    rng = np.random.default_rng(seed)
    cold = sorted(int(i) for i in rng.choice(eligible, size=num_cold, replace=False))
    cold_set = set(cold)

    train_sequences = [[item for item in seq if item not in cold_set] for seq in sequences]
    eval_cases = []
    for user, seq in enumerate(sequences):
        if len(seq) and seq[-1] in cold_set:
            history = [item for item in seq[:-1] if item not in cold_set]
            if history:
                eval_cases.append(ColdStartCase(user, history, seq[-1]))
    return ColdStartSplit(train_sequences, eval_cases, cold)


def cold_eval_cases(split: ColdStartSplit) -> EvalCases:
    return EvalCases(users=np.array([c.user_index for c in split.eval_cases], dtype=np.int64),
                     histories=[np.asarray(c.history, dtype=np.int64) for c in split.eval_cases],
                     targets=np.array([c.target for c in split.eval_cases], dtype=np.int64))


def forget_item_ids(ranker: UnifiedRanker, items: np.ndarray) -> None:
    """New items have no learned id vector: zero their id rows (the content features remain)."""
    with torch.no_grad():
        ranker.item_tower.ebc.embedding_bags["item_id"].weight[torch.as_tensor(items, dtype=torch.int64)] = 0.0


def run_cold_start(cfg: Config, fraction: float = 0.05, split_seed: int = 0, quiet: bool = True) -> dict:
    """Hold out cold items, train `cfg` on the rest (cold items are not in the training catalogue:
    never a target, never a negative, codebooks fitted without them), then rank the full catalogue
    for the users whose last item is cold: the model beside popularity and text kNN."""
    data = load_dataset(cfg.data.path, cfg.data.format, **asdict(cfg.data.synthetic))
    split = cold_start_split(data.sequences, seed=split_seed, fraction=fraction)
    cold = np.array(split.cold_items, dtype=np.int64)
    warm = np.setdiff1d(np.arange(1, data.num_items + 1), cold)
    warm_data = replace(data, sequences=[np.asarray(s, dtype=np.int64) for s in split.train_sequences])
    prep = prepare(cfg, data=warm_data, fit_items=warm)
    prep.excluded_items = cold
    if cfg.eval.checkpoint:  # evaluate a finished (or stopped) cold-start run without training again
        loaded = load_checkpoint(cfg.eval.checkpoint, expect=ranker_config(cfg, prep))
        if loaded.metadata.get("fingerprint") != warm_data.fingerprint():
            raise ValueError(f"{cfg.eval.checkpoint} was not trained on this cold-start split "
                             f"(fraction={fraction}, split_seed={split_seed})")
        seconds, best_epoch, validation = None, loaded.metadata.get("epoch"), loaded.metadata.get("validation")
    else:
        result = train(cfg, prep, quiet=quiet)
        loaded = load_checkpoint(result.checkpoint)
        seconds, best_epoch, validation = round(result.seconds, 1), result.best_epoch, result.best_validation
    ranker = loaded.ranker.eval()
    forget_item_ids(ranker, cold)
    text = prep.lm.text if prep.lm is not None else item_lm_features(data, cfg.data.cache_dir, 0, 0).text
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    scorers = [ModelScorer(ranker), Popularity(prep.split.train, data.num_items), TextKNN(text)]
    for s in scorers:  # every method on the trained tasks only
        s.tasks = tuple(t for t in s.tasks if t in tasks)
    scorers = [s for s in scorers if s.tasks]
    metrics = evaluate_all(scorers, cold_eval_cases(split), prep.builder, ks=cfg.eval.ks,
                           num_bootstrap=cfg.eval.num_bootstrap, seed=cfg.train.seed)
    return {"fraction": fraction, "split_seed": split_seed, "num_cold_items": len(cold),
            "num_eval_users": len(split.eval_cases), "train_seconds": seconds,
            "best_epoch": best_epoch, "validation": validation, "metrics": metrics}
