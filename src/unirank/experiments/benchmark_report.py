"""Tables and plots of a benchmark: every cell is the mean over runs with its spread (sample std,
min, max) and the mean of the runs' bootstrap 95% CIs."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from unirank.experiments.report import bar_chart  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@20", "mrr")


def over_runs(cells: list[dict]) -> dict:
    """{metric: mean/std/min/max/values/ci95} of one method's per-run metric dicts."""
    out = {}
    for metric in cells[0]:
        if not isinstance(cells[0][metric], dict):
            continue
        values = np.array([c[metric]["mean"] for c in cells])
        out[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                       "min": float(values.min()), "max": float(values.max()), "values": values.tolist(),
                       "ci95": [float(np.mean([c[metric]["ci95"][i] for c in cells])) for i in (0, 1)],
                       "n": len(values)}
    return out


def leaderboard(runs: list[dict], baselines: dict[str, dict[str, dict]], name: str,
                peers: dict[str, list[dict]] | None = None) -> dict:
    """{task: {method: over_runs(...)}}: the recipe's runs first, then each peer's runs (one per
    seed; a task the peer cannot answer keeps its `not_applicable` cell), then each baseline (one
    run: baselines are deterministic)."""
    board = {}
    for task in runs[0]["test"]:
        board[task] = {name: over_runs([r["test"][task] for r in runs])}
        singles = [_twin_rows(r)[task] for r in runs if task in _twin_rows(r)]
        if singles:
            board[task][f"{name} single-task"] = over_runs(singles)
        for peer, peer_runs in (peers or {}).items():
            cells = [r["test"][task] for r in peer_runs if task in r["test"]]
            if cells:
                board[task][peer_label(peer)] = cells[0] if "not_applicable" in cells[0] else over_runs(cells)
        for method, metrics in baselines.get(task, {}).items():
            board[task][method] = over_runs([metrics])
    return board


def peer_label(peer: str) -> str:
    return f"{peer} (rectools)"


def _twin_rows(run: dict) -> dict:
    """{row: metrics} of a run's single-task twins (the search twin also answers the zero-shot row)."""
    return {row: m for twin in run.get("twins", {}).values() for row, m in twin["test"].items()}


# Student-t 0.975 quantiles by degrees of freedom (runs - 1); beyond the table, the normal's 1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def alignment(runs: list[dict], metrics=("recall@10", "ndcg@10")) -> dict:
    """Per row: unified minus single-task, paired by seed (negative = tax, positive = transfer):
    the per-seed differences, their mean and sample std, and `t95`, the 95% Student-t interval of
    the mean over seeds (None with one seed)."""
    out = {}
    for row in runs[0]["test"]:
        pairs = [(r["test"][row], _twin_rows(r)[row]) for r in runs if row in _twin_rows(r)]
        if pairs:
            out[row] = {}
            for k in metrics:
                d = np.array([u[k]["mean"] - t[k]["mean"] for u, t in pairs])
                std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
                half = T975.get(len(d) - 1, 1.96) * std / np.sqrt(len(d))
                out[row][k] = {"mean": float(d.mean()), "std": std, "values": d.tolist(), "n": len(d),
                               "t95": [float(d.mean() - half), float(d.mean() + half)] if len(d) > 1 else None}
    return out


def _cell(m: dict) -> str:
    return f"{m['mean']:.4f} ± {m['std']:.4f}" if m["n"] > 1 else f"{m['mean']:.4f}"


def _row(task: str, method: str, m: dict) -> str:
    """One leaderboard line; a peer's MRR is cut at its list length (`mrr@20`), a task it cannot
    answer reads n/a."""
    if "not_applicable" in m:
        return f"| {task} | {method} | n/a (no query input) |" + " |" * len(METRICS)
    cells = [_cell(m[k]) if k in m else "" for k in METRICS]
    truncated = [k for k in m if k.startswith("mrr@")]
    if "mrr" not in m and truncated:
        cells[METRICS.index("mrr")] = f"{_cell(m[truncated[0]])} ({truncated[0]})"
    return f"| {task} | {method} | " + " | ".join(cells) + f" | {m['ndcg@10']['n']} |"


def markdown(report: dict, paths: dict[str, Path]) -> str:
    lines = [f"# {report['dataset']}: `{report['config']}` over seeds {report['seeds']}", "",
             f"Command: `{report['run']['command']}` (commit {report['run']['commit']}, {report['run']['machine']}).",
             f"Selection: {report['selection']} ({report['num_validation_users']} users); "
             f"test: {report['num_test_users']} users, read once per run. "
             "Cells: mean ± sample std over seeds (baselines are deterministic: one run).", ""]
    lines += ["| task | method | " + " | ".join(METRICS) + " | runs |", "|---|---|" + "---|" * (len(METRICS) + 1)]
    for task, by_method in report["leaderboard"].items():
        for method, m in by_method.items():
            lines.append(_row(task, method, m))
    if report.get("alignment"):
        lines += ["", "Alignment tax (unified minus single-task, paired by seed; negative = tax):", "",
                  "| task | Δ recall@10 | Δ ndcg@10 | Δ ndcg@10 95% t-interval | seeds |", "|---|---|---|---|---|"]
        for row, d in report["alignment"].items():
            t95 = d["ndcg@10"].get("t95")
            interval = f"[{t95[0]:+.4f}, {t95[1]:+.4f}]" if t95 else "n/a"
            lines.append(f"| {row} | {d['recall@10']['mean']:+.4f} ± {d['recall@10']['std']:.4f} "
                         f"| {d['ndcg@10']['mean']:+.4f} ± {d['ndcg@10']['std']:.4f} | {interval} | {d['ndcg@10']['n']} |")
    lines += ["", "| seed | selected epoch | validation rounds | train seconds | test reads |", "|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['seed']} | {r['selected_epoch']} | {r['validation_rounds']} | {r['train_seconds']} "
                     f"| {r['test_reads']} |")
    if report.get("peers"):
        lines += ["", "Peers (rectools, their own virtualenv, one run per seed on the same split; "
                  "epoch chosen on all validation users): " + "; ".join(report["peer_notes"]) + ".", "",
                  "| peer | seed | epochs | best epoch | train seconds |", "|---|---|---|---|---|"]
        for peer, peer_runs in report["peers"].items():
            lines += [f"| {peer_label(peer)} | {r['seed']} | {r['epochs']} | {r['best_epoch']} | {r['train_seconds']} |"
                      for r in peer_runs]
    lines += ["", f"![per-task test NDCG@10]({paths['tasks_png'].name})",
              f"![validation NDCG@10 over wall time]({paths['validation_png'].name})"]
    return "\n".join(lines)


def plot_tasks(board: dict, path: Path, metric: str = "ndcg@10") -> None:
    answered = {task: {method: m for method, m in by_method.items() if "not_applicable" not in m}
                for task, by_method in board.items()}
    bar_chart(answered, path, metric, ylabel="test {metric}\n(mean over seeds, 95% CI)")


def plot_validation(runs: list[dict], path: Path) -> None:
    tasks = sorted({k.split("/")[0] for r in runs for row in r["history"] for k in row if k.endswith("/ndcg@10")})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in runs:
            rows = [row for row in r["history"] if f"{task}/ndcg@10" in row]
            ax.plot([row["seconds"] for row in rows], [row[f"{task}/ndcg@10"] for row in rows], marker="o",
                    label=f"seed {r['seed']}")
        ax.set_title(task)
        ax.set_xlabel("wall seconds")
    axes[0][0].set_ylabel("validation NDCG@10")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
