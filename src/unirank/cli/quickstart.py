"""The README's main job on the embedded default: train -> per-task evaluation -> ONNX export ->
a real tritonserver -> one gRPC query per task, checked against the PyTorch model's own top-k."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from unirank.model.request import TASK_NAMES, Task
from unirank.training.checkpoint import load_checkpoint
from unirank.config import load_config
from unirank.evaluation.evaluate import ModelScorer, filter_seen
from unirank.data.examples import build_search_query
from unirank.experiments.report import evaluate_checkpoint, markdown_table, write_report
from unirank.data.prepare import prepare
from unirank.training.train import train


def _torch_top_k(ranker, builder, task: Task, user: int, history: np.ndarray, target: int, k: int) -> list[int]:
    request = builder.build(task, np.array([user]), [history], np.array([target]))
    scores = filter_seen(ModelScorer(ranker).scores(task, request), task, request, [history])
    return torch.topk(scores[0], k).indices.tolist()


def quickstart(config: str = "quickstart", overrides: list[str] | None = None) -> int:
    from unirank.serving.client import RankerClient
    from unirank.serving.export import export_model
    from unirank.serving.model_repository import build_model_repository
    from unirank.serving.server import Server, free_port

    cfg = load_config(config, overrides)
    out = Path(cfg.train.out_dir)
    if (out / "config.yaml").is_file():  # the demo trains from scratch each time: its last run is replaced
        shutil.rmtree(out)
    prep = prepare(cfg)
    print(f"[1/5] training on {prep.data.name}: {len(prep.split.users)} users, {prep.data.num_items} items")
    result = train(cfg, prep, quiet=True)
    print(f"      best epoch {result.best_epoch} in {result.seconds:.0f}s -> {result.checkpoint}")

    print("[2/5] per-task test evaluation (model + baselines)")
    report = evaluate_checkpoint(cfg, result.checkpoint, prep, baselines=cfg.eval.baselines)
    write_report(report, out, name="eval_test")
    print(markdown_table(report["results"], metrics=("recall@10", "ndcg@10")))

    print("[3/5] ONNX export + Triton model repositories")
    export = export_model(result.checkpoint, out / "export", top_k=20)
    repos = build_model_repository(out / "export", out / "repository")
    print(f"      ONNX vs PyTorch max abs score diff {export.max_abs_diff:.2e}; repositories {sorted(repos)}")

    print("[4/5] starting tritonserver (python backend running the same model.onnx)")
    ranker = load_checkpoint(result.checkpoint).ranker.eval()
    user = int(prep.split.users[0])
    history = prep.split.test.histories[0]
    target = int(prep.split.test.targets[0])
    query_text = build_search_query(prep.data, user, target)
    with Server(repos["python"], grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as server:
        print(f"      ready: gRPC {server.grpc_url}")
        print(f"[5/5] one gRPC query per task (search query: {query_text!r})")
        with RankerClient.from_model_dir(server.grpc_url, repos["python"] / "unirank") as client:
            answers = {
                Task.SEARCH: client.search(history.tolist(), query_text, k=10),
                Task.SIMILAR: client.similar(int(history[-1]), k=10),
                Task.PREQUERY: client.recommend(history.tolist(), k=10),
            }
    mismatches = 0
    for task, ranking in answers.items():
        expected = _torch_top_k(ranker, prep.builder, task, user, history, target, 10)
        same = ranking.item_ids.tolist() == expected
        mismatches += not same
        print(f"      {TASK_NAMES[task]:>8}: top-5 {ranking.item_ids[:5].tolist()} "
              f"scores {[round(float(x), 3) for x in ranking.scores[:5]]}" + ("" if same else "  != PyTorch " + str(expected[:5])))
    (out / "quickstart.json").write_text(json.dumps({TASK_NAMES[t]: r.item_ids.tolist() for t, r in answers.items()}))
    return 1 if mismatches else 0
