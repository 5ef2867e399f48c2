"""Cold-start table: combine `unirank cold-start` runs (one per model variant, same split) into one
JSON + Markdown table: R@10 / N@10 on the held-out items, model variants beside popularity and
text kNN (the content-only baseline), and each run's validation score on the warm split (mean
N@10 over the trained tasks, the users whose next item is warm).

    unirank cold-start --config default train.out_dir=runs/cold/<variant> <model overrides>   # per variant
    python benchmarks/cold_start.py runs/cold/* --out runs/cold_start_beauty.json

`--vector-stats` also records, per run, medians over the warm items of its best checkpoint: the norms
of the full item vector, its content part (the vector a new item gets) and the id row, and
||content - full|| / ||full|| (how much of a warm item's vector its content explains).
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
from unirank.experiments.cold_start import cold_start_split
from unirank.training.checkpoint import load_checkpoint
from unirank.training.config import load_config


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
    args = parser.parse_args(argv)
    table = combine(args.runs)
    if args.vector_stats:
        table["vector_stats"] = {d.name: vector_stats(d) for d in args.runs}
        print(json.dumps(table["vector_stats"], indent=1))
    table["command"] = " ".join(["python", "benchmarks/cold_start.py"] + (argv if argv is not None else sys.argv[1:]))
    print(markdown(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
