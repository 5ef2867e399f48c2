"""Alignment tax / transfer gain: the unified model against the same architecture trained on ONE
task only, each evaluated on its own task's test split (negative delta = tax, positive = transfer)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from unirank.config import Config
from unirank.evaluation.evaluate import ZERO_SHOT
from unirank.experiments.report import evaluate_checkpoint
from unirank.model.request import TASK_BY_NAME
from unirank.data.prepare import Prepared, prepare
from unirank.training.train import train

METRICS = ("recall@10", "ndcg@10")


def _with(cfg: Config, tasks: list[str], out_dir: Path) -> Config:
    return replace(cfg, train=replace(cfg.train, tasks=tasks, out_dir=str(out_dir)))


def _checkpoint(cfg: Config, prep: Prepared, given: str | None, quiet: bool) -> tuple[str, float | None]:
    """A given checkpoint (trained elsewhere with `cfg`), or train one now."""
    if given:
        return given, None
    result = train(cfg, prep, quiet=quiet)
    return str(result.checkpoint), round(result.seconds, 1)


def alignment_tax(cfg: Config, quiet: bool = True, unified: str | None = None,
                  single: dict[str, str] | None = None) -> dict:
    """Compares the unified model with one single-task model per task on the test split. Models
    not given as checkpoints (`unified`, `single[task]`, trained with this config) are trained."""
    prep = prepare(cfg)
    root, single = Path(cfg.train.out_dir), single or {}
    unified_cfg = _with(cfg, list(cfg.train.tasks), root / "unified")
    unified_ckpt, unified_seconds = _checkpoint(unified_cfg, prep, unified, quiet)
    unified_eval = evaluate_checkpoint(unified_cfg, unified_ckpt, prep, baselines=False)["results"]
    rows = {}
    for task in cfg.train.tasks:
        single_cfg = _with(cfg, [task], root / f"single-{task}")
        single_ckpt, single_seconds = _checkpoint(single_cfg, prep, single.get(task), quiet)
        single_eval = evaluate_checkpoint(single_cfg, single_ckpt, prep, baselines=False,
                                          tasks=[TASK_BY_NAME[task]])["results"]
        # The single-task search model also answers the zero-shot queries: one more row.
        for row in [task] + ([ZERO_SHOT] if task == "search" and ZERO_SHOT in single_eval else []):
            rows[row] = _row(unified_eval[row]["unirank"], single_eval[row]["unirank"],
                             (unified_ckpt, single_ckpt), (unified_seconds, single_seconds))
    return {"dataset": prep.data.name, "rows": rows}


def _row(u: dict, s: dict, checkpoints: tuple, seconds: tuple) -> dict:
    return {"unified": {k: u[k] for k in METRICS}, "single_task": {k: s[k] for k in METRICS},
            "delta": {k: u[k]["mean"] - s[k]["mean"] for k in METRICS},
            "checkpoints": dict(zip(("unified", "single_task"), checkpoints)),
            "train_seconds": dict(zip(("unified", "single_task"), seconds))}


def markdown(report: dict) -> str:
    lines = ["| task | unified R@10 | single R@10 | delta R@10 | unified N@10 | single N@10 | delta N@10 |",
             "|---|---|---|---|---|---|---|"]
    for task, r in report["rows"].items():
        cells = []
        for k in METRICS:
            cells += [f"{r['unified'][k]['mean']:.4f}", f"{r['single_task'][k]['mean']:.4f}", f"{r['delta'][k]:+.4f}"]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
