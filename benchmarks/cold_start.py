"""Cold-start table: combine `unirank cold-start` runs (one per model variant, same split) into one
JSON + Markdown table: R@10 / N@10 on the held-out items, model variants beside popularity and
text kNN (the content-only baseline), and each run's validation score on the warm split (mean
N@10 over the trained tasks, the users whose next item is warm).

    unirank cold-start --config default train.out_dir=runs/cold/<variant> <model overrides>   # per variant
    python benchmarks/cold_start.py runs/cold/* --out runs/cold_start_beauty.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def markdown(table: dict) -> str:
    lines = ["| task | method | R@10 [95% CI] | N@10 [95% CI] | warm validation score |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['method']} | {fmt(r, 'recall@10')} | {fmt(r, 'ndcg@10')} | "
              f"{'-' if r.get('warm_validation') is None else format(r['warm_validation'], '.4f')} |" for r in table["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    table = combine(args.runs)
    table["command"] = " ".join(["python", "benchmarks/cold_start.py"] + (argv if argv is not None else sys.argv[1:]))
    print(markdown(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
