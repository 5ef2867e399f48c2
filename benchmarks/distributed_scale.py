"""Scale demo of distributed training (configs/scale.yaml): per-rank embedding memory and samples/s
at 1 vs 2 ranks, plus the planner refusing 1 rank under the 4 GB per-rank budget.

    python benchmarks/distributed_scale.py [--out docs/bench/distributed/distributed_scale.json] [key=value ...]

Runs `unirank train --nproc-per-node N` itself (OMP_NUM_THREADS=1 per rank, niced). The 1-rank run lifts the
budget (distributed.memory_budget_gb=12) so there is a 1-rank number to compare with.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(nproc: int, out: Path, overrides: list[str]) -> tuple[int, str, float]:
    cmd = ["nice", "-n", "10", sys.executable, "-m", "unirank.cli.main", "train", "--nproc-per-node", str(nproc),
           "--config", str(ROOT / "src" / "unirank" / "configs" / "scale.yaml"), "--quiet", f"train.out_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "distributed" / "distributed_scale.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    report: dict = {"config": "configs/scale.yaml", "overrides": args.overrides, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="unirank-scale-") as tmp:
        rc, log, _ = launch(1, Path(tmp) / "refused", args.overrides)
        refusal = [line for line in log.splitlines() if "error:" in line]
        report["one_rank_at_4gb_budget"] = {"returncode": rc, "error": refusal[0] if refusal else None}
        print(f"1 rank, 4 GB budget: rc={rc} {refusal[0] if refusal else ''}", flush=True)
        for nproc, extra in ((1, ["distributed.memory_budget_gb=12"]), (2, [])):
            out = Path(tmp) / f"n{nproc}"
            rc, log, wall = launch(nproc, out, args.overrides + extra)
            if rc != 0:
                print(log[-5000:], file=sys.stderr)
                return 1
            res = json.loads((out / "train_result.json").read_text())
            report["runs"][str(nproc)] = {k: res[k] for k in ("samples_per_s", "train_seconds", "steps", "memory", "plan",
                                                              "best_score")} | {"wall_s": round(wall, 1)}
            print(f"{nproc} rank(s): {res['samples_per_s']} samples/s, memory {res['memory']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
