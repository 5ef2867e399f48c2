"""New items through tritonserver: do items the model never trained on rank by what they are?

N trained items are drawn at random (seeded, among items with a title); each one's metadata (title
and attribute names) is copied into a new item with a new external id. The checkpoint is exported
with `--new-items` (serving/new_items.py: the content path alone gives the new items their
vectors), served by the bundled tritonserver, and asked over gRPC, for every new item:
  title search    a search for the new item's own title (a new user: empty history)
  names search    a search for its attribute names (brand, categories)
  similar-item    the item page of its twin (the trained item with the same content)
Each reports the share of new items in the top 10 and their rank in the top 100 (none: not in it);
the title search also reports the twin's rank, the bar a trained item with the same text sets.
`--fresh-boost B` exports with that boost for fresh items (the new ones among them);
`--fresh-neighbours M` gives it only to the M fresh items nearest each row's anchor by text.

    python benchmarks/new_items.py --checkpoint runs/x/best.pt --data ../shared/data/amazon-beauty \\
        --items 50 --out docs/bench/serving/new_items.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from unirank.data.datasets import load_dataset
from unirank.experiments.report import run_metadata
from unirank.serving.client import RankerClient
from unirank.serving.export import export_model
from unirank.serving.model_repository import build_model_repository
from unirank.serving.server import Server, free_port
from unirank.training.checkpoint import load_checkpoint

TOP = 100


def new_item_records(data, keys: list[str], count: int, seed: int) -> list[dict]:
    """`count` trained items with a title, as new-item metadata rows under new external ids."""
    rng = np.random.default_rng(seed)
    titled = [i for i in range(1, data.num_items + 1) if data.item_text[i].strip()]
    chosen = sorted(int(i) for i in rng.choice(titled, size=min(count, len(titled)), replace=False))
    return [{"twin": i, "id": f"new-{keys[i]}", "title": data.item_text[i],
             "attributes": [data.attribute_names[a] for a in data.item_attributes[i]]} for i in chosen]


def rank_of(item: int, ranking) -> int | None:
    """1-based rank of `item` in a Ranking, None when it is not there."""
    hits = np.flatnonzero(ranking.item_ids == item)
    return int(hits[0]) + 1 if len(hits) else None


def hit_rate(ranks: list[int | None], k: int = 10) -> float:
    return round(sum(r is not None and r <= k for r in ranks) / max(len(ranks), 1), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="the dataset the checkpoint was trained on (titles, names)")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh-boost", type=float, default=None,
                        help="export with this model.fresh_boost (new items are fresh: docs/SERVING.md)")
    parser.add_argument("--fresh-neighbours", type=int, default=None,
                        help="export with this model.fresh_neighbours (the boost only on the M fresh items "
                             "nearest the anchor by text; search rows get none)")
    parser.add_argument("--out", default="docs/bench/serving/new_items.json")
    args = parser.parse_args()

    loaded = load_checkpoint(args.checkpoint)
    keys = loaded.catalogue.item_keys
    data = load_dataset(args.data)
    if keys is None or data.item_keys != keys:
        raise SystemExit(f"{args.checkpoint} was not trained on {args.data} (its items' external ids differ)")
    records = new_item_records(data, keys, args.items, args.seed)
    with tempfile.TemporaryDirectory(prefix="unirank-new-items-") as tmp:
        metadata = Path(tmp) / "new.jsonl"
        metadata.write_text("".join(json.dumps({k: r[k] for k in ("id", "title", "attributes")}) + "\n"
                                    for r in records))
        settings = {k: v for k, v in (("fresh_boost", args.fresh_boost), ("fresh_neighbours", args.fresh_neighbours))
                    if v is not None} or None
        report = export_model(args.checkpoint, Path(tmp) / "export", top_k=TOP, parity_requests=64,
                              new_items=metadata, inference_settings=settings)
        served = {item["external_id"]: item["item_id"] for item in report.new_items.items}
        repo = build_model_repository(Path(tmp) / "export", Path(tmp) / "repo", flavours=("python",))
        rows = []
        with Server(repo["python"], free_port(), free_port(), free_port()) as server:
            with RankerClient.from_server(server.grpc_url, timeout_s=30) as client:
                for r in records:
                    new = served[r["id"]]
                    title = client.search([], r["title"], k=TOP)
                    names = client.search([], " ".join(r["attributes"]), k=TOP) if r["attributes"] else None
                    rows.append({"twin": r["twin"], "new_item": new, "title": r["title"],
                                 "title_search_rank": rank_of(new, title),
                                 "twin_title_search_rank": rank_of(r["twin"], title),
                                 "has_names": names is not None,
                                 "names_search_rank": rank_of(new, names) if names is not None else None,
                                 "similar_to_twin_rank": rank_of(new, client.similar(r["twin"], k=TOP))})
    summary = {
        "title_search_top10": hit_rate([r["title_search_rank"] for r in rows]),
        "twin_title_search_top10": hit_rate([r["twin_title_search_rank"] for r in rows]),
        "names_search_top10": hit_rate([r["names_search_rank"] for r in rows if r["has_names"]]),
        "similar_to_twin_top10": hit_rate([r["similar_to_twin_rank"] for r in rows]),
        "title_search_not_in_top100": sum(r["title_search_rank"] is None for r in rows),
        "similar_to_twin_not_in_top100": sum(r["similar_to_twin_rank"] is None for r in rows),
    }
    print(json.dumps(summary, indent=1))
    out = {**run_metadata(" ".join([Path(sys.executable).name, *sys.argv])), "checkpoint": args.checkpoint, "data": args.data, "items": len(rows), "seed": args.seed,
           "fresh_boost": args.fresh_boost, "fresh_neighbours": args.fresh_neighbours,
           "onnx_parity_max_abs_diff": report.max_abs_diff, "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
