"""Alignment tax from benchmark JSONs: the unified model against single-task twins trained apart.

`unirank benchmark --twins` trains every twin beside every unified run. When the twins of one surface
were trained on their own (`unirank benchmark ... "train.tasks=[prequery]"`, same data, split and
seeds), this pairs the two reports by seed: per seed, the unified run's test metric of that surface
minus the twin's, then the mean, the sample std and a 95% Student-t interval over the seeds (each
run's own bootstrap interval is quoted beside it). Nothing is read again: the numbers are the
reports' single test reads. Refuses reports of different datasets or splits, or with unmatched seeds.

    python benchmarks/alignment_tax.py --unified docs/bench/levers/UNIFIED.json \\
        --twin prequery=docs/bench/levers/TWIN.json --out docs/bench/levers/TAX.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from unirank.experiments.report import run_metadata

METRICS = ("recall@10", "ndcg@10")
# Student-t 0.975 quantiles by degrees of freedom (seeds - 1); beyond the table, the normal's 1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def load_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        runs = {int(r["seed"]): r for r in report["runs"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a `unirank benchmark` report ({err})")
    return {"path": str(path), "dataset": report.get("dataset"), "data": report.get("data"),
            "config": report.get("config"), "command": report.get("run", {}).get("command"), "runs": runs}


def paired(unified: dict, twin: dict, task: str) -> dict:
    """{metric: per-seed differences, mean, std, t95} for one surface (negative = tax)."""
    if unified["dataset"] != twin["dataset"] or unified["data"] != twin["data"]:
        raise SystemExit(f"{twin['path']}: another dataset or split than {unified['path']}")
    seeds = sorted(unified["runs"])
    if sorted(twin["runs"]) != seeds:
        raise SystemExit(f"seeds differ: unified {seeds}, {task} twin {sorted(twin['runs'])}")
    out = {"seeds": seeds}
    for metric in METRICS:
        try:
            u = [unified["runs"][s]["test"][task][metric] for s in seeds]
            t = [twin["runs"][s]["test"][task][metric] for s in seeds]
        except KeyError as err:
            raise SystemExit(f"no test {task} {metric} in a run ({err})")
        d = np.array([a["mean"] - b["mean"] for a, b in zip(u, t)])
        std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
        half = float(T975.get(len(d) - 1, 1.96) * std / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[metric] = {"unified": [a["mean"] for a in u], "unified_ci95": [a.get("ci95") for a in u],
                       "twin": [b["mean"] for b in t], "twin_ci95": [b.get("ci95") for b in t],
                       "differences": d.tolist(), "mean": float(d.mean()), "std": std,
                       "t95": [float(d.mean()) - half, float(d.mean()) + half]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unified", type=Path, required=True, help="benchmark JSON of the unified recipe")
    parser.add_argument("--twin", action="append", required=True, metavar="TASK=JSON",
                        help="benchmark JSON of TASK's single-task twin (repeat per surface)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/alignment_tax.py"] + (argv if argv is not None else sys.argv[1:]))
    unified = load_report(args.unified)
    tax = {}
    for spec in args.twin:
        task, sep, path = spec.partition("=")
        if not sep or not task or not path:
            raise SystemExit(f"--twin {spec!r}: expected TASK=JSON")
        twin = load_report(Path(path))
        tax[task] = {"twin": twin["path"], "twin_command": twin["command"], **paired(unified, twin, task)}
    out = {**run_metadata(command), "unified": unified["path"], "unified_command": unified["command"],
           "dataset": unified["dataset"], "alignment": tax,
           "reading": "unified minus twin, paired by seed; negative = a tax; t95 = 95% Student-t over seeds"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("| task | metric | unified | twin | unified - twin (per seed) | mean ± std | t95 |")
    print("|---|---|---|---|---|---|---|")
    for task, row in tax.items():
        for metric in METRICS:
            m = row[metric]
            print(f"| {task} | {metric} | {np.mean(m['unified']):.4f} | {np.mean(m['twin']):.4f} | "
                  + ", ".join(f"{d:+.4f}" for d in m["differences"])
                  + f" | {m['mean']:+.4f} ± {m['std']:.4f} | [{m['t95'][0]:+.4f}, {m['t95'][1]:+.4f}] |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
