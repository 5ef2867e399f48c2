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
- `fresh_boost_curve` evaluates one finished run at several model.fresh_boost values (with the
  config's model.fresh_neighbours: every fresh item, or the anchor's text-nearest ones): the cold
  cases against the warm validation users (the trade-off of boosting items without interactions).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import NamedTuple, Sequence

import numpy as np
import torch

from unirank.model.ranker import UnifiedRanker
from unirank.model.semantic_ids import UNSEEN_COLLISION_CODE
from unirank.evaluation.baselines import Popularity, TextKNN
from unirank.training.checkpoint import LoadedCheckpoint, load_checkpoint
from unirank.config import Config
from unirank.data.datasets import InteractionData, load_dataset
from unirank.evaluation.evaluate import ModelScorer, evaluate_all, hide_excluded, with_seen
from unirank.data.examples import EvalCases, item_counts
from unirank.data.lm_features import item_lm_features
from unirank.model.request import TASK_BY_NAME, TASK_NAMES
from unirank.data.prepare import Prepared, prepare, ranker_config
from unirank.training.train import selection_score, train, validate


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
    """The items as new items get them at export (serving/new_items.py): no learned id vector (zero id
    rows; the content features remain) and semantic-ID collision code 0, not a number of their own."""
    ids = torch.as_tensor(items, dtype=torch.int64)
    tower = ranker.item_tower
    with torch.no_grad():
        tower.ebc.embedding_bags["item_id"].weight[ids] = 0.0
        if tower.semantic_id_sizes:
            tower.item_codes[ids.to(tower.item_codes.device), -1] = UNSEEN_COLLISION_CODE


class ColdStartSetup(NamedTuple):
    data: InteractionData  # the whole dataset (cold items included)
    split: ColdStartSplit
    cold: np.ndarray  # the cold item ids
    warm_data: InteractionData  # the sequences with every cold item removed: what the model trains on
    prep: Prepared  # of warm_data; cold items excluded from the training catalogue


def cold_start_setup(cfg: Config, fraction: float, split_seed: int) -> ColdStartSetup:
    data = load_dataset(cfg.data.path, cfg.data.format, **asdict(cfg.data.synthetic))
    split = cold_start_split(data.sequences, seed=split_seed, fraction=fraction)
    cold = np.array(split.cold_items, dtype=np.int64)
    warm = np.setdiff1d(np.arange(1, data.num_items + 1), cold)
    warm_data = replace(data, sequences=[np.asarray(s, dtype=np.int64) for s in split.train_sequences])
    prep = prepare(cfg, data=warm_data, fit_items=warm)
    prep.excluded_items = cold
    return ColdStartSetup(data, split, cold, warm_data, prep)


def load_cold_start_run(cfg: Config, setup: ColdStartSetup, fraction: float, split_seed: int) -> LoadedCheckpoint:
    """cfg.eval.checkpoint, checked to be a run of this split and model config (its inference-only
    settings, model.fresh_boost, are cfg's)."""
    loaded = load_checkpoint(cfg.eval.checkpoint, expect=ranker_config(cfg, setup.prep))
    if loaded.metadata.get("fingerprint") != setup.warm_data.fingerprint():
        raise ValueError(f"{cfg.eval.checkpoint} was not trained on this cold-start split "
                         f"(fraction={fraction}, split_seed={split_seed})")
    return loaded


def _scorers(cfg: Config, setup: ColdStartSetup, ranker: UnifiedRanker, baselines: bool = True) -> list:
    """The model (and popularity, text kNN), each on the trained tasks only."""
    prep, data = setup.prep, setup.data
    scorers = [ModelScorer(ranker)]
    if baselines:
        text = prep.lm.text if prep.lm is not None else item_lm_features(data, cfg.data.cache_dir, 0, 0).text
        scorers += [Popularity(prep.split.train, data.num_items), TextKNN(text)]
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    for s in scorers:
        s.tasks = tuple(t for t in s.tasks if t in tasks)
    return [s for s in scorers if s.tasks]


def run_cold_start(cfg: Config, fraction: float = 0.05, split_seed: int = 0, quiet: bool = True) -> dict:
    """Hold out cold items, train `cfg` on the rest (cold items are not in the training catalogue:
    never a target, never a negative, codebooks fitted without them), then rank the full catalogue
    for the users whose last item is cold: the model beside popularity and text kNN."""
    setup = cold_start_setup(cfg, fraction, split_seed)
    if cfg.eval.checkpoint:  # evaluate a finished (or stopped) cold-start run without training again
        loaded = load_cold_start_run(cfg, setup, fraction, split_seed)
        seconds, best_epoch, validation = None, loaded.metadata.get("epoch"), loaded.metadata.get("validation")
    else:
        result = train(cfg, setup.prep, quiet=quiet)
        loaded = load_checkpoint(result.checkpoint)
        seconds, best_epoch, validation = round(result.seconds, 1), result.best_epoch, result.best_validation
    ranker = loaded.ranker.eval()
    forget_item_ids(ranker, setup.cold)
    metrics = evaluate_all(_scorers(cfg, setup, ranker), cold_eval_cases(setup.split), setup.prep.builder,
                           ks=cfg.eval.ks, num_bootstrap=cfg.eval.num_bootstrap, seed=cfg.train.seed)
    return {"fraction": fraction, "split_seed": split_seed, "num_cold_items": len(setup.cold),
            "num_eval_users": len(setup.split.eval_cases), "train_seconds": seconds,
            "best_epoch": best_epoch, "validation": validation, "metrics": metrics}


@torch.no_grad()
def shown_scores(ranker: UnifiedRanker, cases: EvalCases, builder, task) -> torch.Tensor:
    """[cases, num_items + 2] the model's scores of the cases as the offline evaluation ranks them:
    the user's seen items, padding and OOV at -inf."""
    histories = list(cases.histories)
    request = with_seen(task, builder.build(task, cases.users, histories, cases.targets), histories)
    return hide_excluded(ModelScorer(ranker).scores(task, request), task, request)


@torch.no_grad()
def score_gaps(ranker: UnifiedRanker, cases: EvalCases, builder, tasks, k: int = 10,
               quantiles=(0.25, 0.5, 0.75, 0.9)) -> dict:
    """Per task, quantiles over the cold cases of (k-th best score - the cold target's score), shown
    items only, clipped at 0: the boost a fresh target needs to enter the top k (its scale)."""
    out = {}
    for task in tasks:
        scores = shown_scores(ranker, cases, builder, task)
        kth = scores.topk(k, dim=1).values[:, -1]
        gap = (kth - scores.gather(1, torch.from_numpy(cases.targets).view(-1, 1)).squeeze(1)).clamp(min=0)
        gap = gap[torch.isfinite(gap)].double()
        out[TASK_NAMES[task]] = {f"q{round(q * 100)}": round(float(gap.quantile(q)), 4) for q in quantiles}
    return out


def fresh_boost_curve(cfg: Config, boosts: Sequence[float], fraction: float = 0.05, split_seed: int = 0) -> dict:
    """One finished cold-start run (cfg.eval.checkpoint) at each model.fresh_boost in `boosts` (the
    fresh items: at most model.fresh_max_count interactions in the warm training split, so every cold
    item): per boost, the model's metrics on the cold cases, and its warm validation metrics per
    task (the run's validation users, whose next item is warm: a boost can only cost them). The
    boost-independent baselines (popularity, text kNN) and the score scale (`score_gaps`, boost 0)
    once."""
    setup = cold_start_setup(cfg, fraction, split_seed)
    loaded = load_cold_start_run(cfg, setup, fraction, split_seed)
    ranker = loaded.ranker.eval()
    forget_item_ids(ranker, setup.cold)
    counts = torch.from_numpy(item_counts(setup.prep.split.train, setup.data.num_items))
    cases, builder = cold_eval_cases(setup.split), setup.prep.builder
    kwargs = {"ks": cfg.eval.ks, "num_bootstrap": cfg.eval.num_bootstrap, "seed": cfg.train.seed}
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    ranker.set_inference_settings(counts, fresh_boost=0.0)
    report = {"fraction": fraction, "split_seed": split_seed, "train_seed": cfg.train.seed,
              "num_cold_items": len(setup.cold), "num_eval_users": len(setup.split.eval_cases),
              "warm_validation_users": cfg.train.eval_users, "fresh_max_count": cfg.model.fresh_max_count,
              "fresh_neighbours": cfg.model.fresh_neighbours,
              "num_fresh_items": int((counts[1: setup.data.num_items + 1] <= cfg.model.fresh_max_count).sum()),
              "best_epoch": loaded.metadata.get("epoch"), "validation": loaded.metadata.get("validation"),
              "score_gaps@10": score_gaps(ranker, cases, builder, tasks),
              "baselines": evaluate_all(_scorers(cfg, setup, ranker)[1:], cases, builder, **kwargs), "points": []}
    for boost in boosts:
        ranker.set_inference_settings(counts, fresh_boost=float(boost), fresh_max_count=cfg.model.fresh_max_count,
                                      fresh_neighbours=cfg.model.fresh_neighbours)
        warm = validate(ranker, setup.prep, tasks, cfg)
        report["points"].append({
            "fresh_boost": float(boost),
            "cold": {task: by["unirank"] for task, by in
                     evaluate_all(_scorers(cfg, setup, ranker, baselines=False), cases, builder, **kwargs).items()},
            "warm_validation": warm, "warm_validation_score": selection_score(warm)})
    return report
