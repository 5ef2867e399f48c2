r"""Side-by-side test quality of unirank and the peers a user would pick (rectools SASRec and
BERT4Rec) on one dataset, per task, under docs/PROTOCOL.md, plus validation NDCG@10
against wall time.

    python benchmarks/quality.py --data ../shared/data/amazon-beauty --out runs/quality_beauty.json \
        [--peers sasrec,bert4rec] [--peer-minutes 15] [--threads 1] \
        [--ours-run runs/beauty/unified [more runs: an ensemble] | --ours-config default --ours-minutes 20 \
         [--ours-set train.eval_every=1 ...] | --no-ours] \
        [--merge] [--plot runs/quality_beauty.png]

The split is the trainer's own (`prepare(cfg)`). Peers run in .venv-peers (`make peers`, or
$UNIRANK_PEERS_PYTHON) through unirank.experiments.peers, which also gives them to `unirank
benchmark --peers`: top-20 lists, metrics from the target's position in the list (absent = miss),
so their MRR is truncated: `mrr@20`. Peers get no query input, so search is marked not applicable
for them. `--merge` adds the models of this
run to an existing --out JSON (e.g. peers today, `--ours-run` later). Several `--ours-run`
directories are evaluated as one ensemble (`EnsembleScorer`: the mean of their log-softmax scores),
with test metrics and the validation metrics on the trainer's validation subset; an ensemble is
an offline result (`unirank export` serves one ranker).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from unirank.experiments.peers import (PEER_LOSS, PEER_NEGATIVES, PEER_NOTES, PEERS, PeerInputError, PeerSettings,
                                       export_split, parse_peers, peer_result, peer_test_metrics, peers_python,
                                       run_peer, validation_curve, validation_subset)

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("search", "similar", "prequery")
# Published pre-query test R@10 on Amazon Beauty (docs/PROTOCOL.md); "seconds to reach" reads them off
# the VALIDATION curve, which is the only per-epoch signal.
ANCHORS_R10 = {"SASRec (TIGER paper)": 0.0605, "HSTU (eSASRec recomputation)": 0.0788, "eSASRec": 0.0928}


class BenchmarkInputError(ValueError):
    pass


def seconds_to_reach(curve: list[list[float]], levels=ANCHORS_R10) -> dict:
    """First wall time at which validation recall@10 (curve rows: seconds, ndcg@10, recall@10)
    reaches each level; None if never."""
    return {name: next((s for s, _, r in curve if r >= level), None) for name, level in levels.items()}


# ---------------------------------------------------------------- peers


def peer_report(out: Path, split, valid_eval: np.ndarray, num_bootstrap: int) -> dict:
    """Test metrics (with CIs) and validation curves from the peer's lists in `out`."""
    result = peer_result(out)
    epochs = result["epoch_rows"]
    tasks = peer_test_metrics(out, split.test.targets, num_bootstrap)
    for task in ("similar", "prequery"):
        curve = validation_curve(out, epochs, split.valid.targets[valid_eval], task)
        tasks[task] = {"test": tasks[task], "validation_curve": curve,
                       "seconds_to_reach_validation_recall@10": seconds_to_reach(curve)}
    load_file = out / "load_average.json"  # absent when the lists came from an older runner
    load = json.loads(load_file.read_text()) if load_file.is_file() else None
    # Wall seconds up to the end of the last epoch's validation (test lists excluded), as for ours.
    return {"kind": "peer (rectools)", "train_wall_seconds": epochs[-1]["seconds"],
            "train_seconds_without_validation": result["train_seconds"], "epochs": result["epochs"],
            "best_epoch": result["best_epoch"], "settings": result["settings"], "versions": result["versions"],
            "validation_users": int(len(valid_eval)), "load_average_1_5_15min": load, "tasks": tasks}


# ---------------------------------------------------------------- ours


def ours_report(run_dir: Path, data_path: str, num_bootstrap: int) -> dict:
    """unirank from a finished run directory: test metrics of best.pt, the validation curve from
    train_history.json."""
    from unirank.experiments.report import evaluate_checkpoint

    cfg = run_config(run_dir, data_path, num_bootstrap)
    evaluated = evaluate_checkpoint(cfg, run_dir / "best.pt", baselines=False)
    history = json.loads((run_dir / "train_history.json").read_text())
    tasks = {}
    for task, by_method in evaluated["results"].items():
        curve = [[row["seconds"], round(row[f"{task}/ndcg@10"], 5), round(row[f"{task}/recall@10"], 5)]
                 for row in history if f"{task}/ndcg@10" in row]
        tasks[task] = {"test": by_method["unirank"], "validation_curve": curve,
                       "seconds_to_reach_validation_recall@10": seconds_to_reach(curve)}
    own = history[-1]["seconds"] if history else None
    report = {"kind": "ours", "run": str(run_dir),
              "train_wall_seconds": own,
              "epochs": history[-1]["epoch"] if history else 0, "best_epoch": evaluated["trained_epoch"],
              "settings": {"config": str(run_dir / "config.yaml"), "tasks": cfg.train.tasks,
                           "threads": cfg.train.threads, "max_minutes": cfg.train.max_minutes},
              "validation_users": cfg.train.eval_users, "tasks": tasks}
    return report


def run_config(run_dir: Path, data_path: str, num_bootstrap: int):
    """The config of a finished `unirank train` directory, refused if a file the report reads is missing."""
    from unirank.config import load_config

    for needed in ("best.pt", "config.yaml", "train_history.json"):
        if not (run_dir / needed).is_file():
            raise BenchmarkInputError(f"--ours-run {run_dir}: no {needed} (a directory written by `unirank train`)")
    return load_config(str(run_dir / "config.yaml"), [f"data.path={data_path}", f"eval.num_bootstrap={num_bootstrap}"])


def ensemble_report(run_dirs: list[Path], data_path: str, num_bootstrap: int) -> dict:
    """Several finished runs as one ensemble: test metrics, and validation metrics on the first run's
    validation subset (its train.eval_users and train.seed), every task."""
    from unirank.model.request import TASK_NAMES, Task
    from unirank.evaluation.evaluate import EnsembleScorer, evaluate_all, evaluate_task
    from unirank.experiments.report import load_trained
    from unirank.data.prepare import prepare

    configs = [run_config(run_dir, data_path, num_bootstrap) for run_dir in run_dirs]
    cfg, prep = configs[0], prepare(configs[0])
    rankers, walls, epochs = [], [], []
    for run_dir, run_cfg in zip(run_dirs, configs):
        loaded = load_trained(run_cfg, run_dir / "best.pt", prep)
        rankers.append(loaded.ranker)
        history = json.loads((run_dir / "train_history.json").read_text())
        walls.append(history[-1]["seconds"] if history else 0.0)
        epochs.append(loaded.metadata.get("epoch"))
    scorer = EnsembleScorer(rankers)
    test = evaluate_all([scorer], prep.split.test, prep.builder, ks=cfg.eval.ks, num_bootstrap=num_bootstrap)
    tasks = {}
    for task in Task:
        valid = evaluate_task(scorer, task, prep.split.valid, prep.builder, ks=cfg.eval.ks,
                              max_users=cfg.train.eval_users, num_bootstrap=0, seed=cfg.train.seed)
        name = TASK_NAMES[task]
        tasks[name] = {"test": test[name]["unirank"], "validation": valid,
                       "seconds_to_reach_validation_recall@10": {a: None for a in ANCHORS_R10}}
    return {"kind": "ours-ensemble", "runs": [str(r) for r in run_dirs], "train_wall_seconds": sum(walls),
            "epochs": epochs, "validation_users": cfg.train.eval_users, "tasks": tasks}


def train_ours(args: argparse.Namespace) -> Path:
    from unirank.config import load_config
    from unirank.training.train import train

    out = ROOT / "runs" / "quality" / Path(args.data).name / "unirank"
    cfg = load_config(args.ours_config, [f"data.path={args.data}", f"train.max_minutes={args.ours_minutes}",
                                         f"train.threads={args.threads}", f"train.out_dir={out}", *args.ours_set])
    out = Path(cfg.train.out_dir)  # --ours-set may name another out_dir
    print(f"[unirank] training {args.ours_config} for at most {args.ours_minutes} min -> {out}", flush=True)
    train(cfg, quiet=True)
    return out


# ---------------------------------------------------------------- output


def fmt(m: dict) -> str:
    return f"{m['mean']:.4f} [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"


def markdown_table(models: dict) -> str:
    head = ["model", "task", "R@5", "R@10", "R@20", "N@5", "N@10", "N@20", "MRR", "train wall s",
            *[f"valid s to R@10 {v}" for v in ANCHORS_R10.values()]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, model in models.items():
        for task in TASKS:
            cell = model["tasks"].get(task)
            if cell is None:
                continue
            if "not_applicable" in cell:
                lines.append(f"| {name} | {task} | n/a (no query input) |" + " |" * (len(head) - 3))
                continue
            t = cell["test"]
            mrr = fmt(t["mrr"]) if "mrr" in t else fmt(t["mrr@20"]) + " (@20)"
            reach = cell["seconds_to_reach_validation_recall@10"].values()
            cells = [f"{t[k]['mean']:.4f}" for k in ("recall@5", "recall@10", "recall@20", "ndcg@5")]
            cells += [fmt(t["ndcg@10"]), f"{t['ndcg@20']['mean']:.4f}", mrr, f"{model['train_wall_seconds']:.0f}"]
            cells += ["-" if s is None else f"{s:.0f}" for s in reach]
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(models: dict, path: Path, task: str = "prequery") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: m["tasks"].get(task, {}).get("validation_curve") for name, m in models.items()}
    curves = {name: c for name, c in curves.items() if c}
    # The legend sits right of the axes (it grows with the number of runs); peers are dashed. Past 20
    # runs the colours repeat, so the marker changes with each round of the palette.
    fig, ax = plt.subplots(figsize=(11, max(4.5, 0.22 * len(curves) + 1)))
    colors, markers = plt.get_cmap("tab20").colors, ".xs^vD"
    for i, (name, curve) in enumerate(curves.items()):
        peer = models[name].get("kind", "").startswith("peer")
        marker = markers[(i // len(colors)) % len(markers)]
        ax.plot([s / 60 for s, _, _ in curve], [n for _, n, _ in curve], marker=marker, label=name,
                color=colors[i % len(colors)], linestyle="--" if peer else "-", linewidth=2.2 if peer else 1.2)
    # Log time: minute budgets and hours-long runs both read.
    ax.set_xscale("log")
    ax.set_xlabel("wall time since training start (min, log scale)")
    ax.set_ylabel(f"validation NDCG@10 ({task})")
    ax.set_title("validation curve (validation users, not test); dashed = peers", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset directory, or `synthetic`")
    parser.add_argument("--out", required=True, help="JSON report")
    parser.add_argument("--plot", help="PNG of validation NDCG@10 vs wall time (pre-query)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list from {PEERS}; empty = none")
    parser.add_argument("--peer-minutes", type=float, default=15.0, help="wall-clock cap per peer")
    parser.add_argument("--peer-max-epochs", type=int, default=200)
    parser.add_argument("--peer-loss", default=PEER_LOSS,
                        help="rectools loss: sampled_softmax (256 negatives, the published Beauty setting) | "
                        "softmax (full catalogue)")
    parser.add_argument("--peer-tag", default="",
                        help="appended to the peer's name in the report, so a longer run merges in beside an earlier one")
    parser.add_argument("--peer-negatives", type=int, default=PEER_NEGATIVES, help="negatives of the sampled losses")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every model trained here")
    ours = parser.add_mutually_exclusive_group()
    ours.add_argument("--ours-run", nargs="+", help="a finished `unirank train` directory (best.pt, "
                      "train_history.json); several: evaluated as one ensemble")
    ours.add_argument("--no-ours", action="store_true", help="peers only")
    parser.add_argument("--ours-config", default="default", help="config to train ours with (no --ours-run)")
    parser.add_argument("--ours-minutes", type=float, default=20.0)
    parser.add_argument("--ours-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the model trained here, e.g. train.eval_every=1 for a "
                        "validation point every epoch")
    parser.add_argument("--ours-name", default="unirank", help="model name in the report (e.g. one per config)")
    parser.add_argument("--merge", action="store_true", help="add this run's models to an existing --out JSON")
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--note", default="", help="free text stored with the run (e.g. CPU contention)")
    parser.add_argument("--reuse-peers", action="store_true",
                        help="report a peer from the lists already in --work-dir instead of training it again")
    parser.add_argument("--work-dir", help="keep the exported split and the peers' raw top-K lists (default: temp)")
    args = parser.parse_args(argv)
    try:
        check_inputs(args)
    except (BenchmarkInputError, PeerInputError) as err:
        parser.error(str(err))
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the arguments, before any data is loaded."""
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise BenchmarkInputError(f"--data {args.data}: no such dataset directory")
    args.peer_list = parse_peers(args.peers)
    if args.ours_set and (args.ours_run or args.no_ours):
        raise BenchmarkInputError("--ours-set applies to the model trained here (not with --ours-run / --no-ours)")
    if args.reuse_peers and not args.work_dir:
        raise BenchmarkInputError("--reuse-peers needs --work-dir (where the earlier run kept its lists)")
    args.peers_python = peers_python() if args.peer_list else None
    for run in args.ours_run or []:
        if not Path(run).is_dir():
            raise BenchmarkInputError(f"--ours-run {run}: no such directory")
    if args.merge and not Path(args.out).is_file():
        raise BenchmarkInputError(f"--merge: {args.out} does not exist yet (run once without --merge)")
    if not args.peer_list and args.no_ours:
        raise BenchmarkInputError("nothing to run: no peers and --no-ours")
    if not (args.ours_run or args.no_ours):  # a bad config fails now, not after the peers' minutes
        from unirank.config import ConfigError, load_config
        try:
            load_config(args.ours_config, [f"data.path={args.data}", *args.ours_set])
        except ConfigError as err:
            raise BenchmarkInputError(f"--ours-config / --ours-set: {err}") from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from unirank.config import load_config
    from unirank.experiments.report import run_metadata
    from unirank.data.prepare import prepare

    cfg = load_config("default", [f"data.path={args.data}"])
    prep = prepare(cfg)
    valid_eval = validation_subset(len(prep.split.valid), cfg.train.eval_users, cfg.train.seed)
    models: dict = {}
    work = contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory(prefix="unirank-q-")
    with work as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        split_path = export_split(prep.split, valid_eval, Path(tmp) / "split.npz")
        for name in args.peer_list:
            variant = (args.peer_loss, args.peer_negatives)  # a non-default variant merges in beside the default
            key = name if variant == (PEER_LOSS, PEER_NEGATIVES) else f"{name}-{variant[0]}-{variant[1]}neg"
            key += f"-{args.peer_tag}" if args.peer_tag else ""
            out = Path(tmp) / key
            if not (args.reuse_peers and (out / "result.json").is_file()):
                settings = PeerSettings(minutes=args.peer_minutes, max_epochs=args.peer_max_epochs,
                                        threads=args.threads, loss=args.peer_loss, negatives=args.peer_negatives)
                run_peer(name, split_path, out, settings, args.peers_python)
            models[key] = peer_report(out, prep.split, valid_eval, args.num_bootstrap)
    if not args.no_ours:
        if args.ours_run and len(args.ours_run) > 1:
            models[args.ours_name] = ensemble_report([Path(r) for r in args.ours_run], args.data, args.num_bootstrap)
        else:
            run_dir = Path(args.ours_run[0]) if args.ours_run else train_ours(args)
            models[args.ours_name] = ours_report(run_dir, args.data, args.num_bootstrap)

    run = run_metadata(" ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]))
    run |= {"models": list(models), "cpu_cores": os.cpu_count(), "threads": args.threads, "note": args.note,
            "peers_reused_from_work_dir": bool(args.reuse_peers)}
    report = json.loads(Path(args.out).read_text()) if args.merge else {
        "benchmark": "quality", "dataset": prep.data.name, "data_path": args.data, "num_items": prep.data.num_items,
        "num_users": len(prep.split.users), "protocol": "docs/PROTOCOL.md (leave-one-out, full "
        "catalogue, history filtered; peers: filter_viewed=True)", "metric_notes": [
            *PEER_NOTES,
            "validation_curve rows: [wall seconds since training start, validation ndcg@10, validation recall@10], "
            "on the trainer's validation subset (train.eval_users), NOT test",
            "seconds_to_reach_validation_recall@10: first validation-curve point at or above each published "
            "TEST R@10 anchor; a validation-curve reading, not a test result"],
        "anchors_test_recall@10": ANCHORS_R10, "runs": [], "models": {}}
    report["runs"].append(run)
    report["models"].update(models)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown_table(report["models"]))
    if args.plot:
        plot_curves(report["models"], Path(args.plot))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
