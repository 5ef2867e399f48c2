"""`unirank benchmark`: one recipe trained once per seed (each run in its own out_dir), each run's
checkpoint chosen on validation only (all validation users), the test split read once per final
run, beside the baselines and, with `--peers`, the sequential peers (rectools SASRec / BERT4Rec,
once per seed on the same split); one JSON, one Markdown page and two plots, mean and spread over
seeds."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from unirank.experiments.benchmark_report import alignment, leaderboard, markdown, plot_tasks, plot_validation
from unirank.evaluation.evaluate import ZERO_SHOT, evaluate_all
from unirank.experiments.peers import (PEER_NOTES, PeerSettings, check_peers, export_split, peer_result,
                                       peer_test_metrics, peers_python, run_peer)
from unirank.experiments.report import baseline_scorers, evaluate_checkpoint, run_metadata
from unirank.config import Config, load_config, to_yaml
from unirank.model.request import TASK_BY_NAME
from unirank.data.prepare import Prepared, prepare
from unirank.training.train import finished_run, train

SELECTION = "best validation round: mean NDCG@10 over the trained tasks, all validation users"


@dataclass
class Progress:
    """Stage lines with an ETA for the whole benchmark, from the seconds the finished runs took."""

    runs: int
    t0: float = field(default_factory=time.time)
    run_seconds: list[float] = field(default_factory=list)

    def say(self, text: str) -> None:
        elapsed = time.time() - self.t0
        left = self.runs - len(self.run_seconds)
        eta = f", ETA {_clock(np.mean(self.run_seconds) * left)}" if self.run_seconds and left else ""
        print(f"[benchmark {_clock(elapsed)}{eta}] {text}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_config(config: str, data: str, seed: int | None, out_dir: Path, overrides: list[str],
               eval_every: int | None) -> Config:
    """The recipe with the run's seed and out_dir, validated on all validation users."""
    extra = [f"data.path={data}", f"train.out_dir={out_dir}", "train.eval_users=null"]
    extra += [f"train.seed={seed}"] if seed is not None else []
    if eval_every is not None:
        extra.append(f"train.eval_every={eval_every}")
    return load_config(config, [*overrides, *extra])


def baselines(prep: Prepared) -> list:
    return baseline_scorers(prep, bm25_fields=("names", "title+names"))


def read_test(cfg: Config, checkpoint: Path, prep: Prepared, tasks=None) -> tuple[dict, int]:
    """The test metrics of the run's checkpoint; every read is logged in the run's out_dir, and the
    count of reads so far is returned beside them."""
    report = evaluate_checkpoint(cfg, checkpoint, prep, baselines=False, split="test", tasks=tasks)
    log = Path(cfg.train.out_dir) / "test_reads.jsonl"
    with log.open("a") as f:
        f.write(json.dumps({"checkpoint": str(checkpoint), "epoch": report["trained_epoch"]}) + "\n")
    return report, len(log.read_text().splitlines())


def train_and_test(cfg: Config, prep: Prepared, quiet: bool, tasks=None) -> dict:
    """One seed: train (validation picks best.pt), then its single test read. A finished run of the
    same config in the out_dir (a benchmark stopped after its training) is read, not trained again."""
    result = finished_run(cfg) or train(cfg, prep, quiet=quiet)
    report, test_reads = read_test(cfg, result.checkpoint, prep, tasks)
    return {"seed": cfg.train.seed, "out_dir": cfg.train.out_dir, "checkpoint": str(result.checkpoint),
            "selected_epoch": result.best_epoch, "trained_epoch": report["trained_epoch"],
            "validation_rounds": [r["epoch"] for r in result.history], "validation": result.best_validation,
            "history": result.history, "train_seconds": round(result.seconds, 1), "test_reads": test_reads,
            "test": {task: by_method["unirank"] for task, by_method in report["results"].items()}}


def twins(cfg: Config, prep: Prepared, quiet: bool) -> dict:
    """The same recipe trained on ONE task per run (out_dir/single-TASK), each read on its own task
    (and the search twin on the zero-shot queries)."""
    out = {}
    for task in cfg.train.tasks:
        single = replace(cfg, train=replace(cfg.train, tasks=[task], out_dir=str(Path(cfg.train.out_dir) / f"single-{task}")))
        run = train_and_test(single, prep, quiet, tasks=[TASK_BY_NAME[task]])
        rows = [task] + ([ZERO_SHOT] if task == "search" and ZERO_SHOT in run["test"] else [])
        out[task] = {**run, "test": {row: run["test"][row] for row in rows}}
    return out


def peer_runs(names: list[str], python: Path, prep: Prepared, seeds: list[int], work: Path,
              settings: PeerSettings, num_bootstrap: int, progress: Progress) -> dict:
    """{peer: one run per seed}: each peer trained with the run's seed on the benchmark's split, its
    epoch chosen on all validation users, its test lists read once (work/NAME-seed-S)."""
    work.mkdir(parents=True, exist_ok=True)
    split_path = export_split(prep.split, np.arange(len(prep.split.valid)), work / "split.npz")
    runs = {}
    for name in names:
        runs[name] = []
        for seed in seeds:
            progress.say(f"peer {name}: seed {seed}, at most {settings.minutes:g} min")
            out = work / f"{name}-seed-{seed}"
            run_peer(name, split_path, out, replace(settings, seed=seed), python)
            result = peer_result(out)
            test = peer_test_metrics(out, prep.split.test.targets, num_bootstrap)
            runs[name].append({"seed": seed, "out_dir": str(out), "epochs": result["epochs"],
                               "best_epoch": result["best_epoch"], "seconds": result["seconds"],
                               "train_seconds": result["train_seconds"], "settings": result["settings"],
                               "versions": result["versions"], "test": {**test, ZERO_SHOT: test["search"]}})
    return runs


def run_benchmark(data: str, config: str = "fast", seeds: int = 3, out: str | Path = "runs/benchmark",
                  overrides: list[str] = (), eval_every: int | None = None, quiet: bool = True,
                  command: str = "", with_twins: bool = False, peers: list[str] = (),
                  peer_settings: PeerSettings = PeerSettings(), peer_python: str | Path | None = None) -> dict:
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    peers = check_peers(list(peers))
    python = peers_python(peer_python) if peers else None  # refused now, before any training
    out = Path(out)
    run = run_metadata(command)  # the tree that runs, before any later checkout moves HEAD
    base = run_config(config, data, None, out / "seed-0", list(overrides), eval_every)
    first = base.train.seed
    progress = Progress(runs=seeds)
    progress.say(f"preparing {data}")
    prep = prepare(base)
    # Peers first: a broken peer environment fails in minutes, not after the recipe's runs.
    peer_settings = replace(peer_settings, threads=base.train.threads or os.cpu_count() or 1)
    peer_results = peer_runs(peers, python, prep, list(range(first, first + seeds)), out / "peers", peer_settings,
                             base.eval.num_bootstrap, progress) if peers else {}
    per_seed_prep = bool(base.model.text_features or base.model.semantic_id_levels)  # codebook fit is seeded
    runs = []
    for i, seed in enumerate(range(first, first + seeds)):
        cfg = run_config(config, data, seed, out / f"seed-{seed}", list(overrides), eval_every)
        progress.say(f"run {i + 1}/{seeds}: seed {seed}, training at least {cfg.train.max_epochs} epochs and "
                     f"{cfg.train.min_steps} updates (train_result.json of each seed: the sized schedule)")
        t = time.time()
        run_prep = prepare(cfg) if per_seed_prep and i else prep
        runs.append(train_and_test(cfg, run_prep, quiet))
        if with_twins:
            progress.say(f"run {i + 1}/{seeds}: single-task twins of seed {seed}")
            runs[-1]["twins"] = twins(cfg, run_prep, quiet)
        progress.run_seconds.append(time.time() - t)
        progress.say(f"run {i + 1}/{seeds} done: selected epoch {runs[-1]['selected_epoch']}")
    progress.say("baselines on test")
    base_results = evaluate_all(baselines(prep), prep.split.test, prep.builder, ks=base.eval.ks,
                                num_bootstrap=base.eval.num_bootstrap, progress=True)
    report = {"dataset": prep.data.name, "data": str(data), "config": config, "seeds": [r["seed"] for r in runs],
              "selection": SELECTION, "eval_every": base.train.eval_every,
              "min_steps": base.train.min_steps, "eval_rounds": base.train.eval_rounds,
              "num_validation_users": len(prep.split.valid.users), "num_test_users": len(prep.split.test.users),
              "runs": runs, "baselines": base_results, "peers": peer_results,
              "peer_notes": list(PEER_NOTES) if peers else [],
              "leaderboard": leaderboard(runs, base_results, f"unirank ({config})", peer_results),
              "alignment": alignment(runs),
              "recipe": to_yaml(base), "seconds": round(time.time() - progress.t0, 1),
              "run": run}
    progress.say("done")
    return report


def write_benchmark(report: dict, prefix: str | Path) -> dict[str, Path]:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": prefix.with_suffix(".json"), "markdown": prefix.with_suffix(".md"),
             "tasks_png": prefix.parent / f"{prefix.name}_tasks.png",
             "validation_png": prefix.parent / f"{prefix.name}_validation.png"}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["markdown"].write_text(markdown(report, paths) + "\n")
    plot_tasks(report["leaderboard"], paths["tasks_png"])
    plot_validation(report["runs"], paths["validation_png"])
    return paths
