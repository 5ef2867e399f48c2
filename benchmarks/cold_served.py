"""Cold items through tritonserver: served recall equals the offline cold-start recall.

A `unirank cold-start` run held items out of training (experiments/cold_start.py). This benchmark
serves that checkpoint with the held-out items as new items get them at export: their item vectors
come from `serving/new_items.py` (`new_item_vectors`: the content path over their title and attribute
names, the text encoder run on that text, the semantic-ID codes of the text-nearest trained item),
written over the held-out rows of the exported item table; they have no training interaction, so the
fresh items' boost (`--fresh-boost`, `--fresh-neighbours`) treats them as new. It then asks the
bundled tritonserver over gRPC, for every cold-start test user, for pre-query recommendations (their
history, every seen item excluded) and the similar-item page of their newest history item, and
counts the held-out target in the top 10.

Offline, the same cases are scored by `unirank cold-start`'s evaluation (id rows of the held-out items
zeroed, the same boost), with the bootstrap 95% CI. The table puts served R@10 beside the offline
R@10 and its CI, and says whether the served number lies inside it. It also records how far the
new-item vectors are from the offline rows (max |difference|), and how many served top-10 lists
differ from the offline ones.

    python benchmarks/cold_served.py runs/cold/rec-distill1-sid3 --fresh-boost 1.5 --fresh-neighbours 20 \\
        --out docs/bench/cold_start/cold_served_amazon-beauty.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from unirank.config import load_config
from unirank.data.examples import item_counts
from unirank.evaluation.evaluate import ModelScorer, evaluate_all
from unirank.experiments.cold_start import (cold_eval_cases, cold_start_setup, forget_item_ids, load_cold_start_run,
                                            shown_scores)
from unirank.experiments.report import run_metadata
from unirank.model.request import Task
from unirank.serving.client import RankerClient
from unirank.serving.model_repository import build_model_repository
from unirank.serving.new_items import NewItem, new_item_vectors
from unirank.serving.onnx_graph import export_onnx
from unirank.serving.server import Server, free_port

K = 10
TASKS = {"prequery": Task.PREQUERY, "similar": Task.SIMILAR}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `unirank cold-start` run directory (config.yaml, best.pt)")
    parser.add_argument("--fresh-boost", type=float, default=0.0)
    parser.add_argument("--fresh-neighbours", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    command = " ".join(["python", "benchmarks/cold_served.py"] + (argv if argv is not None else sys.argv[1:]))

    report_in = json.loads((args.run / "cold_start.json").read_text())
    cfg = load_config(str(args.run / "config.yaml"), [
        f"eval.checkpoint={args.run / 'best.pt'}", f"eval.num_bootstrap={args.bootstrap}",
        f"model.fresh_boost={args.fresh_boost}", f"model.fresh_neighbours={args.fresh_neighbours}"])
    setup = cold_start_setup(cfg, report_in["fraction"], report_in["split_seed"])
    loaded = load_cold_start_run(cfg, setup, report_in["fraction"], report_in["split_seed"])
    ranker = loaded.ranker.eval()
    # The held-out items as the offline evaluation sees them: no id row, no training interaction.
    forget_item_ids(ranker, setup.cold)
    counts = torch.from_numpy(item_counts(setup.prep.split.train, setup.data.num_items))
    ranker.set_inference_settings(counts, fresh_boost=args.fresh_boost, fresh_max_count=cfg.model.fresh_max_count,
                                  fresh_neighbours=args.fresh_neighbours)
    cases, builder = cold_eval_cases(setup.split), setup.prep.builder
    offline = evaluate_all([ModelScorer(ranker)], cases, builder, ks=[K], num_bootstrap=args.bootstrap,
                           seed=cfg.train.seed)

    # The served model: the held-out rows replaced by what `--new-items` gives items with their metadata.
    data = setup.data
    items = [NewItem(0, f"held-out-{i}", data.item_text[i], [data.attribute_names[a] for a in data.item_attributes[i]])
             for i in setup.cold]
    vectors, _ = new_item_vectors(ranker, loaded.catalogue, items)
    plain = ranker.to_plain().eval()
    table = plain.item_tower.table
    cold = torch.as_tensor(setup.cold, dtype=torch.int64)
    vector_diff = float((table[cold] - vectors.to(table.dtype)).abs().max())
    with torch.no_grad():
        table[cold] = vectors.to(table.dtype)

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="unirank-cold-served-") as tmp:
        export_onnx(plain, Path(tmp) / "export", top_k=K, tokenizer=loaded.tokenizer)
        repo = build_model_repository(Path(tmp) / "export", Path(tmp) / "repo", flavours=("python",))
        with Server(repo["python"], free_port(), free_port(), free_port()) as server:
            with RankerClient.from_server(server.grpc_url, timeout_s=60) as client:
                for name, task in TASKS.items():
                    if name not in offline:
                        continue
                    reference = shown_scores(ranker, cases, builder, task).topk(K, dim=1).indices.numpy()
                    hits, differ = 0, 0
                    for i, (history, target) in enumerate(zip(cases.histories, cases.targets)):
                        history = [int(h) for h in history]
                        ranking = (client.recommend(history, k=K) if task == Task.PREQUERY
                                   else client.similar(history[-1], k=K))
                        served = [int(x) for x in ranking.item_ids[:K]]
                        hits += int(int(target) in served)
                        differ += int(sorted(served) != sorted(reference[i].tolist()))
                    off = offline[name]["unirank"]["recall@10"]
                    served_recall = hits / len(cases.targets)
                    rows[name] = {"served_recall@10": round(served_recall, 4), "offline_recall@10": off["mean"],
                                  "offline_ci95": off["ci95"], "users": len(cases.targets),
                                  "served_within_ci": off["ci95"][0] <= served_recall <= off["ci95"][1],
                                  "top10_sets_differing": differ}
    out = {**run_metadata(command), "run": str(args.run), "fresh_boost": args.fresh_boost,
           "fresh_neighbours": args.fresh_neighbours, "num_cold_items": len(setup.cold),
           "new_item_vectors_max_abs_diff": round(vector_diff, 6), "tasks": rows}
    print("| task | served R@10 | offline R@10 [95% CI] | within CI | top-10 sets differing | users |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['served_recall@10']:.4f} | {r['offline_recall@10']:.4f} "
              f"[{r['offline_ci95'][0]:.4f}, {r['offline_ci95'][1]:.4f}] | {r['served_within_ci']} | "
              f"{r['top10_sets_differing']} | {r['users']} |")
    print(f"new-item vectors vs the offline rows: max |diff| {vector_diff:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
