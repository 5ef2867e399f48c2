"""Per-task test evaluation of a checkpoint beside the baselines, written as JSON, a Markdown table
and a PNG bar chart."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unirank.evaluation.baselines import (BM25, ItemKNN, LastItemQueries, LastItemTransitions, Popularity,
                                          QueryPopularity)  # noqa: E402
from unirank.training.checkpoint import load_checkpoint, read_bundle  # noqa: E402
from unirank.config import Config, to_yaml  # noqa: E402
from unirank.evaluation.evaluate import ModelScorer, evaluate_all  # noqa: E402
from unirank.data.prepare import Prepared, prepare, ranker_config  # noqa: E402

HEADLINE = ("recall@10", "ndcg@10")


def run_metadata(command: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    return {"command": command, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "commit": commit or "unknown",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def baseline_scorers(prep: Prepared, bm25_fields: tuple[str, ...] = ("title+names",)) -> list:
    """Popularity, item-kNN, last-item transitions and one BM25 per entry of `bm25_fields`
    (BM25.FIELDS); with a query catalogue, the suggest baselines too."""
    suggest = [] if prep.queries is None else [QueryPopularity(prep.queries), LastItemQueries(prep.data, prep.queries)]
    return [Popularity(prep.split.train, prep.data.num_items), ItemKNN(prep.split.train, prep.data.num_items),
            LastItemTransitions(prep.split.train, prep.data.num_items),
            *(BM25(prep.data, prep.tokenizer, fields) for fields in bm25_fields), *suggest]


def load_trained(cfg: Config, checkpoint: str | Path, prep: Prepared):
    """The checkpoint, loaded against `cfg`'s model config; refused if it was trained on other data."""
    loaded = load_checkpoint(checkpoint, expect=ranker_config(cfg, prep))
    if loaded.metadata.get("fingerprint") not in (None, prep.data.fingerprint()):
        raise ValueError(f"{checkpoint} was trained on other data than {cfg.data.path} "
                         f"(dataset fingerprint {loaded.metadata['fingerprint']} != {prep.data.fingerprint()})")
    return loaded


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, prep: Prepared | None = None,
                        baselines: bool = True, split: str = "test", tasks=None) -> dict:
    """Test metrics of the checkpoint (and the baselines) for every task (or `tasks`). The checkpoint
    is checked before the data is prepared, so a wrong path fails in seconds."""
    if prep is None:
        read_bundle(checkpoint)
        prep = prepare(cfg)
    loaded = load_trained(cfg, checkpoint, prep)
    scorers = [ModelScorer(loaded.ranker, tasks=tasks)] + (baseline_scorers(prep) if baselines else [])
    cases = prep.split.test if split == "test" else prep.split.valid
    results = evaluate_all(scorers, cases, prep.builder, ks=cfg.eval.ks, num_bootstrap=cfg.eval.num_bootstrap,
                           progress=True)
    return {"dataset": prep.data.name, "split": split, "checkpoint": str(checkpoint),
            "trained_epoch": loaded.metadata.get("epoch"), "results": results, "config": to_yaml(cfg)}


def _fmt(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.4f} [{lo:.4f}, {hi:.4f}]"


def markdown_table(results: dict[str, dict[str, dict]], metrics=("recall@10", "ndcg@10", "recall@20", "mrr")) -> str:
    lines = ["| task | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for task, by_method in results.items():
        for method, m in by_method.items():
            lines.append(f"| {task} | {method} | " + " | ".join(_fmt(m[k]) for k in metrics if k in m) + " |")
    return "\n".join(lines)


def bar_chart(results: dict[str, dict[str, dict]], path: Path, metric: str = "ndcg@10",
              ylabel: str = "test {metric} (95% CI)") -> None:
    """Per-task bars of each method's `metric` (cells: mean + ci95), unirank's first."""
    tasks = list(results)
    methods = sorted({m for r in results.values() for m in r}, key=lambda m: (not m.startswith("unirank"), m))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        cells = [(x, results[t][method][metric]) for x, t in enumerate(tasks) if method in results[t]]
        xs = [x + i * width for x, _ in cells]
        ys = [m["mean"] for _, m in cells]
        errs = [[max(0.0, m["mean"] - m["ci95"][0]) for _, m in cells], [max(0.0, m["ci95"][1] - m["mean"]) for _, m in cells]]
        ax.bar(xs, ys, width, yerr=errs, label=method, capsize=2)
    ax.set_xticks([t + width * (len(methods) - 1) / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel(ylabel.format(metric=metric))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path, name: str = "eval") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["markdown"].write_text(f"# {report.get('dataset', '')} ({report.get('split', 'test')})\n\n"
                                 + markdown_table(report["results"]) + "\n")
    bar_chart(report["results"], paths["png"])
    return paths
