"""Suggest while the user types: test metrics of trained suggest models with a typed prefix of 0, 1,
2, ... characters of the next query, beside the suggest baselines under the same prefix (popular
queries with a prefix = prefix completion by popularity). With a prefix, only the catalogue
queries that complete it are ranked (evaluate_task's `prefix_chars`); the model is the one trained
without prefixes, its order among the completions is the personalization.

Each run's test read is logged in its `test_reads.jsonl` (one read per run and command).

    python benchmarks/suggest_prefix.py --runs RUN_DIR [RUN_DIR ...] --names NAME [NAME ...] \\
        --prefix-chars 0 1 2 3 --out docs/bench/suggest/suggest_prefix_DATASET.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unirank.evaluation.baselines import LastItemQueries, QueryPopularity
from unirank.evaluation.evaluate import ModelScorer, evaluate_task
from unirank.experiments.report import load_trained, run_metadata
from unirank.model.request import QueryTask
from unirank.config import load_config
from unirank.data.prepare import prepare

def markdown(rows: list[dict]) -> str:
    lines = ["| prefix chars | method | R@10 [95% CI] | N@10 [95% CI] | MRR | users |", "|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        cell = lambda k: f"{m[k]['mean']:.4f} [{m[k]['ci95'][0]:.4f}, {m[k]['ci95'][1]:.4f}]"  # noqa: E731
        lines.append(f"| {r['prefix_chars']} | {r['method']} | {cell('recall@10')} | {cell('ndcg@10')} | "
                     f"{m['mrr']['mean']:.4f} | {m['num_users']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="training run directories (config.yaml + best.pt) "
                        "of models that train suggest, on the same data")
    parser.add_argument("--names", nargs="+", default=None, help="a row name per run (default: the run directory)")
    parser.add_argument("--prefix-chars", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--out", required=True, help="JSON path (a .md table is written beside it)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (e.g. data.path=...)")
    args = parser.parse_args()
    names = args.names or [str(r) for r in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--names needs one name per run ({len(args.runs)}), got {len(names)}")
    if any(c < 0 for c in args.prefix_chars):
        parser.error("--prefix-chars must be >= 0")
    runs = [Path(r) for r in args.runs]
    for run in runs:
        for needed in ("config.yaml", "best.pt"):
            if not (run / needed).is_file():
                parser.error(f"{run / needed} not found: --runs takes training run directories")

    command = " ".join(["python", *sys.argv])
    rows, prep, catalogue = [], None, None
    for run, name in zip(runs, names):
        cfg = load_config(str(run / "config.yaml"), args.overrides)
        if "suggest" not in cfg.train.tasks:
            raise SystemExit(f"{run}: this model does not train suggest (train.tasks={cfg.train.tasks})")
        run_prep = prepare(cfg)
        if catalogue is not None and run_prep.queries.texts != catalogue:
            raise SystemExit(f"{run}: another query catalogue than {runs[0]} (other data or split settings)")
        if prep is None:
            prep, catalogue = run_prep, run_prep.queries.texts
        ranker = load_trained(cfg, run / "best.pt", run_prep).ranker.eval()
        cases = run_prep.split.test if args.split == "test" else run_prep.split.valid
        scorer = ModelScorer(ranker, name=name, tasks=(QueryTask.SUGGEST,))
        for chars in args.prefix_chars:
            metrics = evaluate_task(scorer, QueryTask.SUGGEST, cases, run_prep.builder, num_bootstrap=args.num_bootstrap,
                                    seed=cfg.train.seed, prefix_chars=chars)
            rows.append({"prefix_chars": chars, "method": name, "run": str(run), "metrics": metrics})
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        if args.split == "test":
            with (run / "test_reads.jsonl").open("a") as f:
                f.write(json.dumps({"checkpoint": str(run / "best.pt"), "reader": "suggest_prefix",
                                    "prefix_chars": args.prefix_chars}) + "\n")

    cases = prep.split.test if args.split == "test" else prep.split.valid
    baselines = {"popular-queries": QueryPopularity(prep.queries), "last-item-queries": LastItemQueries(prep.data, prep.queries)}
    for name, scorer in baselines.items():
        for chars in args.prefix_chars:
            metrics = evaluate_task(scorer, QueryTask.SUGGEST, cases, prep.builder, num_bootstrap=args.num_bootstrap,
                                    prefix_chars=chars)
            rows.append({"prefix_chars": chars, "method": name, "metrics": metrics})
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)

    rows.sort(key=lambda r: (r["prefix_chars"], r["method"] not in names, r["method"]))
    report = {"benchmark": "suggest_prefix", "dataset": prep.data.name, "split": args.split,
              "num_queries": len(prep.queries), "prefix_chars": args.prefix_chars, "runs": [str(r) for r in runs],
              "rows": rows, "run": run_metadata(command)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print(f"wrote {out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
