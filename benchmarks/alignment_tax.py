"""Alignment tax from benchmark reports: the unified model against single-task twins trained apart.

`unirank benchmark --twins` trains every twin beside every unified run. When the twins of one surface
were trained on their own (`unirank benchmark ... "train.tasks=[prequery]"`, same data, split and
seeds), this pairs the two reports by seed exactly as `--twins` does (experiments/benchmark_report.py
`alignment`): per seed, the unified run's test metric of that surface minus the twin's, their mean,
sample std and 95% Student-t interval over the seeds; each run's own bootstrap interval is kept
beside it. Nothing is read again: the numbers are the reports' single test reads. Reports of
different datasets or splits, or with unmatched seeds, are refused.

    python benchmarks/alignment_tax.py --unified docs/bench/levers/UNIFIED.json \\
        --twin prequery=docs/bench/levers/TWIN.json --out docs/bench/levers/TAX.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unirank.experiments.benchmark_report import alignment
from unirank.experiments.report import run_metadata

METRICS = ("recall@10", "ndcg@10")


def load_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        runs = {int(r["seed"]): r for r in report["runs"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a `unirank benchmark` report ({err})")
    return {"path": str(path), "dataset": report.get("dataset"), "data": report.get("data"),
            "config": report.get("config"), "command": report.get("run", {}).get("command"), "runs": runs}


def paired_runs(unified: dict, twins: dict[str, dict]) -> list[dict]:
    """The unified runs, each with its seed's twins attached as `unirank benchmark --twins` does."""
    seeds = sorted(unified["runs"])
    runs = []
    for seed in seeds:
        run = {"seed": seed, "test": unified["runs"][seed]["test"], "twins": {}}
        for task, twin in twins.items():
            if twin["dataset"] != unified["dataset"] or twin["data"] != unified["data"]:
                raise SystemExit(f"{twin['path']}: another dataset or split than {unified['path']}")
            if sorted(twin["runs"]) != seeds:
                raise SystemExit(f"seeds differ: unified {seeds}, {task} twin {sorted(twin['runs'])}")
            test = twin["runs"][seed]["test"]
            if task not in test or task not in run["test"]:
                raise SystemExit(f"no test {task} row in seed {seed} of {twin['path']} or {unified['path']}")
            run["twins"][task] = {"test": {task: test[task]}}
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unified", type=Path, required=True, help="benchmark JSON of the unified recipe")
    parser.add_argument("--twin", action="append", required=True, metavar="TASK=JSON",
                        help="benchmark JSON of TASK's single-task twin (repeat per surface)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/alignment_tax.py"] + (argv if argv is not None else sys.argv[1:]))
    unified, twins = load_report(args.unified), {}
    for spec in args.twin:
        task, sep, path = spec.partition("=")
        if not sep or not task or not path:
            raise SystemExit(f"--twin {spec!r}: expected TASK=JSON")
        twins[task] = load_report(Path(path))
    runs = paired_runs(unified, twins)
    tax = alignment(runs, METRICS)
    per_seed = {task: {m: {"unified": [r["test"][task][m]["mean"] for r in runs],
                           "unified_ci95": [r["test"][task][m].get("ci95") for r in runs],
                           "twin": [r["twins"][task]["test"][task][m]["mean"] for r in runs],
                           "twin_ci95": [r["twins"][task]["test"][task][m].get("ci95") for r in runs]}
                       for m in METRICS} for task in twins}
    out = {**run_metadata(command), "unified": unified["path"], "unified_command": unified["command"],
           "twins": {task: {"path": t["path"], "command": t["command"]} for task, t in twins.items()},
           "dataset": unified["dataset"], "seeds": [r["seed"] for r in runs], "alignment": tax, "per_seed": per_seed,
           "reading": "unified minus twin, paired by seed; negative = a tax; t95 = 95% Student-t over seeds"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("| task | metric | unified (mean) | twin (mean) | unified - twin per seed | mean ± std | t95 |")
    print("|---|---|---|---|---|---|---|")
    for task in twins:
        for metric in METRICS:
            d, s = tax[task][metric], per_seed[task][metric]
            t95 = "n/a" if d["t95"] is None else f"[{d['t95'][0]:+.4f}, {d['t95'][1]:+.4f}]"
            print(f"| {task} | {metric} | {sum(s['unified']) / len(runs):.4f} | {sum(s['twin']) / len(runs):.4f} | "
                  + ", ".join(f"{v:+.4f}" for v in d["values"]) + f" | {d['mean']:+.4f} ± {d['std']:.4f} | {t95} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
