"""The sequential peers a user would pick instead of unirank (rectools SASRec / BERT4Rec), on our
split and under our evaluation (docs/PROTOCOL.md), for `unirank benchmark --peers` and
benchmarks/quality.py.

The peers train in their own virtualenv (`make peers` makes `.venv-peers`; `UNIRANK_PEERS_PYTHON`
names another python) through rectools_peer.py beside this module, which returns top-20 lists.
Their metrics are computed here from the target's position in each list (absent = miss) with the
protocol's metric functions, so their MRR is truncated: `mrr@20`. Similar-item for a peer is the
next item after the source item read as a one-item history; peers have no query input, so search
is not applicable to them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unirank.evaluation.metrics import metrics_from_ranks, summarize

PEERS = ("sasrec", "bert4rec")
PEER_LOSS, PEER_NEGATIVES = "sampled_softmax", 256  # the published rectools setting for Beauty (rectools_peer.py)
K = 20  # the length of the peers' lists
PEER_TASKS = ("similar", "prequery")
PEER_SEARCH = "not applicable: the peer has no query input (BM25 is the search baseline, docs/RESULTS.md)"
PEER_NOTES = (
    "peers: metrics from top-20 lists (target absent = miss); MRR is mrr@20 (truncated), ours is full MRR",
    "peers can only recommend items seen in training (rectools id map); a target unseen in training is a miss",
    "similar-item for peers: a one-item history (the source item), only the source item filtered",
)
PEER_SCRIPT = Path(__file__).with_name("rectools_peer.py")
PYTHON_ENV = "UNIRANK_PEERS_PYTHON"
REPO_PYTHON = Path(__file__).resolve().parents[3] / ".venv-peers" / "bin" / "python"  # `make peers` in a checkout
# Past its own cap the peer still writes the test lists of every user: the backstop leaves room for that.
STARTUP_AND_TEST_LISTS_SECONDS = 600


class PeerInputError(ValueError):
    pass


@dataclass(frozen=True)
class PeerSettings:
    """How one peer trains: the wall-clock cap (evaluation included), the epochs and the loss."""

    minutes: float = 15.0
    max_epochs: int = 200
    threads: int = 1
    loss: str = PEER_LOSS
    negatives: int = PEER_NEGATIVES
    seed: int = 0

    def __post_init__(self):
        if not self.minutes > 0:
            raise PeerInputError(f"--peer-minutes must be > 0, got {self.minutes}")


# ---------------------------------------------------------------- which peers, which python


def parse_peers(text: str) -> list[str]:
    """`sasrec,bert4rec` -> the list; an unknown name is refused with the known ones."""
    return check_peers([p.strip() for p in text.split(",") if p.strip()])


def check_peers(names: list[str]) -> list[str]:
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise PeerInputError(f"--peers: unknown peer {', '.join(unknown)} (known: {', '.join(PEERS)})")
    return names


def peers_python(path: str | Path | None = None) -> Path:
    """The python of the peers' virtualenv: `path`, else $UNIRANK_PEERS_PYTHON, else the checkout's
    .venv-peers; refused when it is not there."""
    python = Path(path or os.environ.get(PYTHON_ENV) or REPO_PYTHON)
    if not python.is_file():
        raise PeerInputError(f"peers need their own python, {python} is missing: run `make peers` in the "
                             f"repository (it makes .venv-peers), or set {PYTHON_ENV} to that virtualenv's python")
    return python


# ---------------------------------------------------------------- metrics from top-K lists


def ranks_from_top_k(lists: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each row's target in its top-K list; +inf (a miss) when absent.
    Padding (-1) never matches: item ids start at 1."""
    lists, targets = np.asarray(lists), np.asarray(targets)
    hit = lists == targets[:, None]
    return np.where(hit.any(1), hit.argmax(1), np.inf).astype(np.float64)


def top_k_metrics(lists: np.ndarray, targets: np.ndarray, ks=(5, 10, 20), num_bootstrap: int = 1000) -> dict:
    """Protocol metrics (mean + bootstrap CI) from top-K lists; MRR is cut at K: `mrr@K`."""
    if max(ks) > lists.shape[1]:
        raise PeerInputError(f"metrics @{max(ks)} need top-{max(ks)} lists, got top-{lists.shape[1]}")
    per_user = metrics_from_ranks(ranks_from_top_k(lists, targets), list(ks))
    per_user[f"mrr@{lists.shape[1]}"] = per_user.pop("mrr")
    return summarize(per_user, num_bootstrap=num_bootstrap) | {"num_users": int(len(targets))}


# ---------------------------------------------------------------- the split for the peers


def validation_subset(num_users: int, eval_users: int | None, seed: int) -> np.ndarray:
    """The users the trainer validates on (`train.eval_users`, same draw as evaluate_task), so the
    peers' validation curves are on the same users as ours."""
    idx = np.arange(num_users)
    if eval_users is not None and eval_users < num_users:
        idx = np.sort(np.random.default_rng(seed).choice(idx, eval_users, replace=False))
    return idx


def export_split(split, valid_eval: np.ndarray, path: Path) -> Path:
    """split.npz for the peer: training rows (user, item, position) from s_1..s_{n-2}, the
    validation target s_{n-1} with its position (test histories end with it), and the validation
    subset. Test targets stay here: the peer never sees them."""
    lengths = np.array([len(s) for s in split.train], dtype=np.int64)
    np.savez(path, user=split.users, train_user=np.repeat(split.users, lengths),
             train_item=np.concatenate(split.train).astype(np.int64),
             train_position=np.concatenate([np.arange(n) for n in lengths]).astype(np.int64),
             valid_target=split.valid.targets.astype(np.int64), valid_position=lengths,
             valid_eval=np.asarray(valid_eval, dtype=np.int64))
    return path


# ---------------------------------------------------------------- running a peer


def run_peer(name: str, split_path: Path, out: Path, settings: PeerSettings, python: Path) -> None:
    """Trains the peer with the peers' python; its lists, epochs.jsonl and result.json land in `out`.
    The peer stops itself at its cap; a peer still running well past it is stopped and refused."""
    cmd = [str(python), str(PEER_SCRIPT), "--split", str(split_path), "--model", name, "--out", str(out),
           "--minutes", str(settings.minutes), "--threads", str(settings.threads), "--loss", settings.loss,
           "--max-epochs", str(settings.max_epochs), "--n-negatives", str(settings.negatives),
           "--seed", str(settings.seed), "--k", str(K)]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "PYTHONWARNINGS": "ignore"}
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    timeout = 60 * settings.minutes + STARTUP_AND_TEST_LISTS_SECONDS
    try:
        proc = subprocess.run(cmd, env=env, stdout=2, timeout=timeout)  # its progress lines: our stderr
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"peer {name} still ran {timeout:.0f} s after it started (cap {settings.minutes} "
                           "min): stopped") from err
    if proc.returncode != 0:
        raise RuntimeError(f"peer {name} failed (exit {proc.returncode}); its python: {python}")
    # The machine may be shared: the load average says how much of a core the peer really had.
    load = {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]}
    (out / "load_average.json").write_text(json.dumps(load))


def peer_result(out: Path) -> dict:
    """What the peer says of its run (epochs, best epoch, settings, versions) and its epochs."""
    result = json.loads((out / "result.json").read_text())
    result["epoch_rows"] = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    return result


def peer_test_metrics(out: Path, targets: np.ndarray, num_bootstrap: int) -> dict:
    """{task: metrics} of the peer's test lists, search marked not applicable."""
    lists = np.load(out / "test.npz")
    return {"search": {"not_applicable": PEER_SEARCH},
            **{task: top_k_metrics(lists[task], targets, num_bootstrap=num_bootstrap) for task in PEER_TASKS}}


def validation_curve(out: Path, epoch_rows: list[dict], targets: np.ndarray, task: str) -> list[list[float]]:
    """[wall seconds, validation ndcg@10, validation recall@10] per epoch, from the per-epoch lists
    of the validation users (`targets`: their validation targets)."""
    curve = []
    for row in epoch_rows:
        m = top_k_metrics(np.load(out / f"valid_epoch{row['epoch']:04d}.npz")[task], targets, num_bootstrap=0)
        curve.append([row["seconds"], round(m["ndcg@10"]["mean"], 5), round(m["recall@10"]["mean"], 5)])
    return curve
