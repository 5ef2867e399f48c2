r"""Trains one rectools peer (SASRec or BERT4Rec) on a split exported by unirank.experiments.peers
(`unirank benchmark --peers`, benchmarks/quality.py) and writes its top-K lists: per epoch for the
validation users, at the end for every test user.

    .venv-peers/bin/python src/unirank/experiments/rectools_peer.py --split DIR/split.npz --model sasrec \
        --out DIR/sasrec [--minutes 15] [--threads 1] [--loss softmax] [--max-epochs 200] [--seed 0]

Runs in .venv-peers (rectools, pytorch-lightning), never in unirank's own environment, and imports
nothing from unirank. Epochs are `fit_partial(max_epochs=1)` calls: rectools' `recommend` needs a
fitted model, which a lightning callback inside one long `fit()` does not have. The weights of the
epoch with the best pre-query validation NDCG@10 give the test lists (validation-only model
selection, as in the protocol).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rectools import Columns
from rectools.dataset import Dataset
from rectools.models import BERT4RecModel, SASRecModel
from rectools.models.nn.item_net import IdEmbeddingsItemNet

# Beauty-scale settings (Amazon 5-core, ~9 items per user), none tuned on our split:
# SASRec: the eSASRec authors' selected hyperparameters for Beauty (blondered/transformer_benchmark
# README: emb 64, 1 block, 1 head, dropout 0.2, max len 50, lr 1e-3, sampled softmax with 256
# negatives, 200 epochs, patience 50); that is their "SASRec+SS" (published test R@10 0.0921).
# BERT4Rec: the BERT4Rec paper's Amazon Beauty setting (hidden 64, 2 layers, 2 heads, max len 50,
# mask proportion 0.6) with the same loss. Item ids only: no item features reach either peer.
# Loss default: rectools' full-catalogue "softmax" builds [batch, items, 50] logits through a
# transpose and took ~10 s per batch of 128 on one contended CPU thread (> 15 min per Beauty
# epoch), so the default is the published sampled softmax; --loss softmax still runs it.
PEER_SETTINGS = {
    "sasrec": dict(n_factors=64, n_blocks=1, n_heads=1, dropout_rate=0.2, session_max_len=50, lr=1e-3,
                   batch_size=128),
    "bert4rec": dict(n_factors=64, n_blocks=2, n_heads=2, dropout_rate=0.2, session_max_len=50, lr=1e-3,
                     batch_size=128, mask_prob=0.6),
}
PEER_CLASSES = {"sasrec": SASRecModel, "bert4rec": BERT4RecModel}
PATIENCE = 50  # validation rounds (= epochs) without improvement, as in the published setting


def interactions(users: np.ndarray, items: np.ndarray, positions: np.ndarray) -> pd.DataFrame:
    """rectools interactions; the position in the user's sequence stands in for the timestamp."""
    return pd.DataFrame({Columns.User: users, Columns.Item: items, Columns.Weight: 1.0,
                         Columns.Datetime: pd.to_datetime(positions, unit="s")})


def build_model(name: str, loss: str, n_negatives: int, seed: int):
    torch.manual_seed(seed)
    kwargs = dict(PEER_SETTINGS[name], loss=loss, epochs=1, verbose=0, deterministic=True,
                  item_net_block_types=(IdEmbeddingsItemNet,), recommend_torch_device="cpu")
    if loss != "softmax":
        kwargs["n_negatives"] = n_negatives
    return PEER_CLASSES[name](**kwargs)


def top_k(model, users: np.ndarray, dataset: Dataset, k: int) -> np.ndarray:
    """[len(users), k] recommended item ids in rank order, -1 where a user got fewer (cold users:
    no item known to the model in their history)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = model.recommend(users=users, dataset=dataset, k=k, filter_viewed=True,
                               on_unsupported_targets="ignore")
    out = np.full((len(users), k), -1, dtype=np.int64)
    row = pd.Series(np.arange(len(users)), index=users)
    out[row[recs[Columns.User]].to_numpy(), recs[Columns.Rank].to_numpy() - 1] = recs[Columns.Item].to_numpy()
    return out


def ndcg_at_10(lists: np.ndarray, targets: np.ndarray) -> float:
    """Only for picking the best epoch here; the reported metrics are computed by unirank.experiments.peers."""
    hit_rank = np.where(lists[:, :10] == targets[:, None])
    gains = np.zeros(len(targets))
    gains[hit_rank[0]] = 1.0 / np.log2(hit_rank[1] + 2.0)
    return float(gains.mean()) if len(targets) else 0.0


class PeerData:
    """The split as rectools datasets: training rows (s_1..s_{n-2}), test histories (+ s_{n-1}),
    and the one-item histories of the similar-item task (source s_{n-2} for validation, s_{n-1}
    for test)."""

    def __init__(self, split: dict):
        users, train_user = split["user"], split["train_user"]
        train = interactions(train_user, split["train_item"], split["train_position"])
        valid_rows = interactions(users, split["valid_target"], split["valid_position"])
        self.users, self.valid_targets = users, split["valid_target"]
        self.eval_users = users[split["valid_eval"]]
        self.eval_targets = self.valid_targets[split["valid_eval"]]
        self.train = Dataset.construct(train)
        self.test = Dataset.construct(pd.concat([train, valid_rows], ignore_index=True))
        last_train_item = train.groupby(Columns.User, sort=False)[Columns.Item].last().reindex(users).to_numpy()
        zero = np.zeros(len(users), dtype=np.int64)
        self.similar_valid = Dataset.construct(interactions(users, last_train_item, zero))
        self.similar_test = Dataset.construct(interactions(users, self.valid_targets, zero))


def train_and_recommend(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = PeerData(dict(np.load(args.split)))
    model = build_model(args.model, args.loss, args.n_negatives, args.seed)
    t0, train_seconds, best, best_state, best_epoch, stale = time.time(), 0.0, -1.0, None, 0, 0
    log = (out / "epochs.jsonl").open("w")
    epoch = 0
    while epoch < args.max_epochs and stale < PATIENCE:
        epoch += 1
        t_epoch = time.time()
        model.fit_partial(data.train, min_epochs=1, max_epochs=1)
        train_seconds += time.time() - t_epoch
        lists = {"prequery": top_k(model, data.eval_users, data.train, args.k),
                 "similar": top_k(model, data.eval_users, data.similar_valid, args.k)}
        np.savez_compressed(out / f"valid_epoch{epoch:04d}.npz", **lists)
        score = ndcg_at_10(lists["prequery"], data.eval_targets)
        row = {"epoch": epoch, "seconds": round(time.time() - t0, 1), "train_seconds": round(train_seconds, 1),
               "prequery_ndcg@10": round(score, 5)}
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.lightning_model.state_dict())
        else:
            stale += 1
        # Stop before an epoch that would end past the cap (the last epoch's time as the estimate).
        if time.time() - t0 + (time.time() - t_epoch) > 60 * args.minutes:
            break
    log.close()
    model.lightning_model.load_state_dict(best_state)
    np.savez_compressed(out / "test.npz", prequery=top_k(model, data.users, data.test, args.k),
                        similar=top_k(model, data.users, data.similar_test, args.k))
    settings = dict(PEER_SETTINGS[args.model], loss=args.loss, item_net="ids only", epochs_max=args.max_epochs,
                    patience=PATIENCE, minutes_cap=args.minutes, torch_threads=args.threads, seed=args.seed)
    if args.loss != "softmax":
        settings["n_negatives"] = args.n_negatives
    import rectools
    import pytorch_lightning
    result = {"model": args.model, "epochs": epoch, "best_epoch": best_epoch, "seconds": round(time.time() - t0, 1),
              "train_seconds": round(train_seconds, 1), "settings": settings,
              "versions": {"rectools": rectools.__version__, "torch": torch.__version__,
                           "pytorch_lightning": pytorch_lightning.__version__}}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="split.npz written by unirank.experiments.peers")
    parser.add_argument("--model", required=True, choices=sorted(PEER_SETTINGS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock cap, evaluation included")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loss", default="sampled_softmax", choices=["softmax", "sampled_softmax", "BCE", "gBCE"])
    parser.add_argument("--n-negatives", type=int, default=256, help="for the sampled losses")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.split).is_file():
        parser.error(f"--split {args.split}: no such file")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # per-fit() banners
        logging.getLogger(name).setLevel(logging.ERROR)
    train_and_recommend(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
