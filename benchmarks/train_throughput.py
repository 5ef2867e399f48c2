"""Training throughput of the trainer in this tree beside the trainer of another git revision, side
by side in one run: the same config, data and seed, one epoch each, alternating A B A B ... so that
load on the machine hits both alike.

    python benchmarks/train_throughput.py --baseline-rev REV [--config fast] [--repeats 3]
        [--out docs/bench/training/train_throughput.json] [key=value ...]

Each measurement is a fresh process that prepares the data (not timed), then times `train(cfg, prep)`
for one epoch (validation on train.eval_users users and the checkpoints included, as a user pays
them). samples/s = training rows of the epoch (every task's rows) / seconds. The baseline revision
is checked out into a temporary git worktree and imported from there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import json, os, sys, time, tempfile
sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None
try:
    from unirank.config import load_config
except ImportError:
    from unirank.training.config import load_config
from unirank.data.examples import TrainingExamples
from unirank.training.train import train
try:  # where this tree keeps them; a baseline revision may keep them in training/train.py
    from unirank.data.prepare import prepare
    from unirank.model.request import TASK_BY_NAME
except ImportError:
    from unirank.training.train import TASK_BY_NAME, prepare
import unirank.training.train as module
cfg = load_config(sys.argv[2], json.loads(sys.argv[3]) + [f"train.out_dir={tempfile.mkdtemp()}/run"])
if hasattr(cfg.train, "min_steps"):  # one epoch is one epoch, also in a tree whose schedules have a floor
    cfg.train.min_steps = 0
prep = prepare(cfg)
tasks = tuple(TASK_BY_NAME[t] for t in cfg.train.tasks)
rows = sum(b.request.batch_size for b in TrainingExamples(prep.split, prep.builder, cfg.train.batch_size,
                                                           cfg.train.seed, tasks).epoch())
t0 = time.perf_counter()
result = train(cfg, prep, quiet=True)
seconds = time.perf_counter() - t0
print("RESULT " + json.dumps({"seconds": seconds, "rows": rows, "module": module.__file__,
                              "validation": result.best_validation}))
"""


def package_tree(checkout: Path, into: Path) -> Path:
    """The import root of a checkout's `unirank`: its src/ folder, or for a revision from before the
    src/ layout a `unirank` package made of links to its top-level folders."""
    if (checkout / "src" / "unirank").is_dir():
        return checkout / "src"
    pkg = into / "unirank"
    pkg.mkdir(parents=True)
    # a regular package: as a namespace portion it would lose to this tree's installed unirank
    (pkg / "__init__.py").touch()
    for folder in sorted(checkout.iterdir()):  # the package folders and configs/, as its setup.py mapped them
        if (folder / "__init__.py").is_file() or folder.name == "configs":
            (pkg / folder.name).symlink_to(folder)
    return into


def measure(root: str, config: str, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, root, config, json.dumps(overrides)], env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", required=True, help="git revision whose trainer is the baseline")
    parser.add_argument("--config", default="fast")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "training" / "train_throughput.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ["train.max_epochs=1", "train.eval_every=1", "train.eval_users=1000", *args.overrides]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    base = subprocess.run(["git", "rev-parse", "--short", args.baseline_rev], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="unirank-throughput-") as tmp:
        checkout = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(checkout), base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {"this tree": "", f"baseline {base}": str(package_tree(checkout, Path(tmp) / "pkg"))}
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for i in range(args.repeats):
                for name, root in trees.items():
                    m = measure(root, args.config, overrides)
                    m["samples_per_s"] = m["rows"] / m["seconds"]
                    runs[name].append(m)
                    print(f"[{i + 1}/{args.repeats}] {name:18s} {m['seconds']:7.1f} s  {m['samples_per_s']:8.1f} "
                          f"samples/s  ({m['module']})", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, capture_output=True)
    summary = {name: {stat: round(fn([m["samples_per_s"] for m in ms]), 1)
                      for stat, fn in (("min", min), ("median", statistics.median), ("max", max))}
               for name, ms in runs.items()}
    report = {"command": " ".join([sys.executable, *sys.argv]), "commit": commit, "baseline": base,
              "config": args.config, "overrides": overrides, "machine": platform.machine(),
              "cpus": os.cpu_count(), "samples_per_s": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, s in summary.items():
        print(f"{name:18s} samples/s min {s['min']} median {s['median']} max {s['max']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
