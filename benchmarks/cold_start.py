"""Cold-start table: combine `unirank cold-start` runs (one per model variant, same split) into one
JSON + Markdown table: R@10 / N@10 on the held-out items, model variants beside popularity and
text kNN (the content-only baseline), and each run's validation score on the warm split (mean
N@10 over the trained tasks, the users whose next item is warm).

    unirank cold-start --config default train.out_dir=runs/cold/<variant> <model overrides>   # per variant
    python benchmarks/cold_start.py runs/cold/* --out runs/cold_start_beauty.json

`--vector-stats` also records, per run, medians over the warm items of its best checkpoint: the norms
of the full item vector, its content part (the vector a new item gets) and the id row, and
||content - full|| / ||full|| (how much of a warm item's vector its content explains).

`--fresh-boosts 0,1,2` evaluates each run's best checkpoint again at each model.fresh_boost (no
retraining; experiments/cold_start.py fresh_boost_curve): the cold cases beside the warm validation
users, the trade-off curve, plotted beside the JSON (`--out` with .png) as cold R@10 against warm
validation N@10. `--fresh-max-count N` sets model.fresh_max_count (default: the run config's);
`--fresh-neighbours 0,10,50` draws one curve per model.fresh_neighbours (0: every fresh item gets the
boost; M: only the M fresh items nearest the row's anchor by text, the candidate union).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from unirank.data.datasets import load_dataset
from unirank.experiments.cold_start import cold_start_split, fresh_boost_curve
from unirank.experiments.report import run_metadata
from unirank.training.checkpoint import load_checkpoint
from unirank.config import load_config


def fmt(m: dict, key: str) -> str:
    lo, hi = m[key]["ci95"]
    return f"{m[key]['mean']:.4f} [{lo:.4f}, {hi:.4f}]"


def combine(run_dirs: list[Path]) -> dict:
    runs = {}
    for d in run_dirs:
        path = d / "cold_start.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (run `unirank cold-start ... train.out_dir={d}` first)")
        runs[d.name] = json.loads(path.read_text())
    splits = {(r["fraction"], r["split_seed"], r["num_cold_items"], r["num_eval_users"]) for r in runs.values()}
    if len(splits) != 1:
        raise SystemExit(f"runs use different cold-start splits: {sorted(splits)}")
    rows = []
    first = next(iter(runs.values()))
    for task, by_method in first["metrics"].items():
        for method in by_method:
            if method != "unirank":
                rows.append({"task": task, "method": method, **{k: by_method[method][k] for k in ("recall@10", "ndcg@10")}})
        for name, r in runs.items():
            m = r["metrics"][task]["unirank"]
            rows.append({"task": task, "method": f"unirank/{name}", "epochs": r["best_epoch"],
                         "train_seconds": r["train_seconds"], "warm_validation": (r.get("validation") or {}).get("score"),
                         **{k: m[k] for k in ("recall@10", "ndcg@10")}})
    return {"split": dict(zip(("fraction", "split_seed", "num_cold_items", "num_eval_users"), splits.pop())),
            "rows": rows, "runs": {name: r.get("run", {}) for name, r in runs.items()}}


def vector_stats(run_dir: Path) -> dict:
    """Medians over the run's warm items (its cold-start split recomputed from its config)."""
    report = json.loads((run_dir / "cold_start.json").read_text())
    cfg = load_config(str(run_dir / "config.yaml"))
    data = load_dataset(cfg.data.path, cfg.data.format, **asdict(cfg.data.synthetic))
    cold = cold_start_split(data.sequences, seed=report["split_seed"], fraction=report["fraction"]).cold_items
    warm = torch.from_numpy(np.setdiff1d(np.arange(1, data.num_items + 1), cold))
    tower = load_checkpoint(run_dir / "best.pt").ranker.eval().item_tower
    with torch.no_grad():
        content, full = tower.content_and_full(warm)
        id_rows = tower.id_table()[warm]
    median = lambda t: round(float(t.median()), 4)  # noqa: E731
    return {"num_warm_items": len(warm), "median_full_norm": median(full.norm(dim=1)),
            "median_content_norm": median(content.norm(dim=1)), "median_id_row_norm": median(id_rows.norm(dim=1)),
            "median_relative_content_error": median((content - full).norm(dim=1) / full.norm(dim=1).clamp(min=1e-12))}


def boost_curve(run_dir: Path, boosts: list[float], max_count: int | None, neighbours: int = 0) -> dict:
    report = json.loads((run_dir / "cold_start.json").read_text())
    cfg = load_config(str(run_dir / "config.yaml"), [f"eval.checkpoint={run_dir / 'best.pt'}",
                                                     f"model.fresh_neighbours={neighbours}"] +
                      ([] if max_count is None else [f"model.fresh_max_count={max_count}"]))
    return fresh_boost_curve(cfg, boosts, fraction=report["fraction"], split_seed=report["split_seed"])


def curve_markdown(name: str, curve: dict) -> str:
    tasks = list(curve["points"][0]["cold"])
    warm = list(curve["points"][0]["warm_validation"])
    lines = [f"fresh items (<= {curve['fresh_max_count']} training interactions): {curve['num_fresh_items']}; "
             f"{name}: cold R@10 / N@10 per task, warm validation N@10 per task and their mean",
             "| boost | " + " | ".join(f"cold {t} R@10 | N@10" for t in tasks) + " | " +
             " | ".join(f"warm {t} N@10" for t in warm) + " | warm mean |",
             "|---" * (1 + 2 * len(tasks) + len(warm) + 1) + "|"]
    for p in curve["points"]:
        cold = " | ".join(f"{p['cold'][t]['recall@10']['mean']:.4f} | {p['cold'][t]['ndcg@10']['mean']:.4f}" for t in tasks)
        warm_cells = " | ".join(f"{p['warm_validation'][t]['ndcg@10']['mean']:.4f}" for t in warm)
        lines.append(f"| {p['fresh_boost']:g} | {cold} | {warm_cells} | {p['warm_validation_score']:.4f} |")
    base = curve["baselines"]
    lines.append("baselines (cold R@10): " + ", ".join(f"{t} {m} {v['recall@10']['mean']:.4f}"
                                                      for t, by in base.items() for m, v in by.items()))
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path) -> None:
    """Per task (pre-query, similar-item; those trained): cold R@10 (x) against warm validation N@10
    of that task (y), one point per boost, the text-kNN cold R@10 as a vertical line."""
    import matplotlib  # plotting is optional: only --fresh-boosts needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = next(iter(curves.values()))["points"][0]["cold"]
    tasks = [t for t in ("prequery", "similar") if t in trained]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    axes = axes[0]
    for ax, task in zip(axes, tasks):
        for i, (name, curve) in enumerate(curves.items()):
            xs = [p["cold"][task]["recall@10"]["mean"] for p in curve["points"]]
            ys = [p["warm_validation"][task]["ndcg@10"]["mean"] for p in curve["points"]]
            ax.plot(xs, ys, "o-", color=f"C{i}", label=name)
            for p, x, y in zip(curve["points"], xs, ys):
                ax.annotate(f"{p['fresh_boost']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            knn = curve["baselines"].get(task, {}).get("text-knn")
            if knn is not None and i == 0:  # the same baseline under every curve of one run
                ax.axvline(knn["recall@10"]["mean"], color="grey", ls="--", lw=1, label="text kNN (cold R@10)")
        ax.set(xlabel=f"cold items, {task} R@10", ylabel=f"warm validation, {task} N@10",
               title=f"{task}: fresh boost (labels) trade-off")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(table: dict) -> str:
    lines = ["| task | method | R@10 [95% CI] | N@10 [95% CI] | warm validation score |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['method']} | {fmt(r, 'recall@10')} | {fmt(r, 'ndcg@10')} | "
              f"{'-' if r.get('warm_validation') is None else format(r['warm_validation'], '.4f')} |" for r in table["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--vector-stats", action="store_true", help="item-vector medians of each run's checkpoint")
    parser.add_argument("--fresh-boosts", type=lambda v: [float(b) for b in v.split(",")], default=None,
                        metavar="B1,B2,...", help="evaluate each run's checkpoint at these model.fresh_boost values")
    parser.add_argument("--fresh-max-count", type=int, default=None, help="model.fresh_max_count of the curve")
    parser.add_argument("--fresh-neighbours", type=lambda v: [int(m) for m in v.split(",")], default=[0],
                        metavar="M1,M2,...", help="one curve per model.fresh_neighbours value (0: every fresh item)")
    args = parser.parse_args(argv)
    table = combine(args.runs)
    if args.vector_stats:
        table["vector_stats"] = {d.name: vector_stats(d) for d in args.runs}
        print(json.dumps(table["vector_stats"], indent=1))
    if args.fresh_boosts is not None:
        table["fresh_boost_curve"] = {
            d.name + ("" if m == 0 else f"/fresh_neighbours={m}"): boost_curve(d, args.fresh_boosts, args.fresh_max_count, m)
            for d in args.runs for m in args.fresh_neighbours}
        for name, curve in table["fresh_boost_curve"].items():
            print(curve_markdown(name, curve))
    table["command"] = " ".join(["python", "benchmarks/cold_start.py"] + (argv if argv is not None else sys.argv[1:]))
    if args.fresh_boosts is not None:  # the tree and machine that evaluated the curve (the runs name their own)
        table["evaluated"] = run_metadata(table["command"])
    print(markdown(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1))
        print(f"wrote {args.out}")
        if args.fresh_boosts is not None:
            plot_curves(table["fresh_boost_curve"], args.out.with_suffix(".png"))
            print(f"wrote {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
