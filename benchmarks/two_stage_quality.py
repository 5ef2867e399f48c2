"""End-task quality through the two-stage path: test metrics of a trained checkpoint on every task,
the exact model (every item scored in PyTorch) beside the served two-stage answer (context.onnx +
item index, loaded as the python model loads it) for each index setup, with 95% bootstrap CIs.

A two-stage row ranks only the top_k items it returns (a target outside them is a miss), as a
client of the server sees it.

    python benchmarks/two_stage_quality.py --run runs/bench-beauty/seed-42 --setups flat hnsw:ef_search=256
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from serving_load import commit, machine
from unirank.evaluation.evaluate import ModelScorer, evaluate_all
from unirank.experiments.report import load_trained, markdown_table
from unirank.model.request import INPUT_NAMES, Task
from unirank.serving.context_export import export_context_onnx, item_vectors, load_two_stage
from unirank.serving.item_index import IndexOptions, ItemIndex
from unirank.config import load_config
from unirank.data.prepare import prepare

KNOBS = {"ef_search", "nprobe", "refine", "hnsw_m", "ef_construction", "nlist", "pq_m"}


def parse_setup(text: str) -> tuple[str, IndexOptions]:
    """`kind[:knob=value,...]`, e.g. `ivfpq:nprobe=256,refine=10` -> (the text, IndexOptions)."""
    kind, _, knobs = text.partition(":")
    values = dict(pair.split("=", 1) for pair in knobs.split(",") if pair)
    unknown = set(values) - KNOBS
    if unknown:
        raise ValueError(f"unknown index settings {sorted(unknown)} in {text!r}; known: {sorted(KNOBS)}")
    return text, IndexOptions(kind, **{k: int(v) for k, v in values.items()})


class TwoStageScorer:
    """The served two-stage answer as a scorer: its top_k scores, -inf for every other id."""

    tasks = (Task.SEARCH, Task.SIMILAR, Task.PREQUERY)

    def __init__(self, answer, num_items: int, name: str):
        self.answer, self.num_items, self.name = answer, num_items, name

    def scores(self, task: Task, request) -> torch.Tensor:
        batch = {name: getattr(request, name).numpy().astype(np.int64) for name in INPUT_NAMES if name != "candidates"}
        batch["candidates"] = np.zeros((len(batch["task"]), 1), np.int64)
        ids, scores = self.answer(batch)
        out = torch.full((len(ids), self.num_items + 2), -torch.inf)
        out.scatter_(1, torch.from_numpy(ids), torch.from_numpy(scores))
        out[:, 0] = -torch.inf  # unfilled slots are id 0
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a training run directory (config.yaml + best.pt)")
    parser.add_argument("--setups", nargs="+", default=["flat"], help="index setups, kind[:knob=value,...]")
    parser.add_argument("--split", choices=("test", "valid"), default="test")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--num-bootstrap", type=int, default=1000)
    parser.add_argument("--max-users", type=int, default=None, help="a fixed random subset of users (default: all)")
    parser.add_argument("--out", default="docs/bench/serving/two_stage_quality.json")
    parser.add_argument("overrides", nargs="*", help="config overrides (e.g. data.path=...)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = load_config(str(run / "config.yaml"), args.overrides)
    prep = prepare(cfg)
    loaded = load_trained(cfg, run / "best.pt", prep)
    plain = loaded.ranker.to_plain().eval()
    cases = prep.split.test if args.split == "test" else prep.split.valid
    scorers = [ModelScorer(loaded.ranker, name="exact")]
    builds = {}
    with tempfile.TemporaryDirectory(prefix="unirank-two-stage-") as tmp:
        for text, options in map(parse_setup, args.setups):
            directory = Path(tmp) / str(len(builds))
            export_context_onnx(plain, directory)
            started = time.perf_counter()
            ItemIndex.build(item_vectors(plain), plain.config.similarity, plain.config.temperature, options).save(directory)
            builds[text] = {"options": vars(options), "index_build_s": round(time.perf_counter() - started, 1)}
            scorers.append(TwoStageScorer(load_two_stage(directory, args.top_k), plain.num_items, f"two-stage {text}"))
        results = evaluate_all(scorers, cases, prep.builder, ks=cfg.eval.ks, num_bootstrap=args.num_bootstrap,
                               max_users=args.max_users, progress=True)
    within = {task: {name: _within_exact(by_method[name], by_method["exact"]) for name in by_method if name != "exact"}
              for task, by_method in results.items()}
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(), "machine": machine(),
              "checkpoint": str(run / "best.pt"), "dataset": prep.data.name, "split": args.split,
              "num_items": int(plain.num_items), "top_k": args.top_k, "max_users": args.max_users, "setups": builds,
              "recall@10_within_exact_ci": within, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown_table(results))
    print(json.dumps(within, indent=1))
    print(f"wrote {args.out}")


def _within_exact(metrics: dict, exact: dict) -> bool:
    lo, hi = exact["recall@10"]["ci95"]
    return bool(lo <= metrics["recall@10"]["mean"] <= hi)


if __name__ == "__main__":
    main()
