"""Catalogue scale: exact in-graph scoring vs two-stage retrieval (context graph + item index) as the
catalogue grows, through the real tritonserver.

For each catalogue size N the trained model's item table is extended to N items: the trained vectors
first, then synthetic ones drawn from a Gaussian with the empirical mean and covariance of the
trained item vectors (ids 1..N; the OOV row stays the trained one). Per setup (exact, and each index
kind) it reports latency p50/p99 at c=1, throughput at c=16 (single-row mixed-task requests from the
typed client), the server's RSS (tritonserver + python stub) and its growth per item, the index file's
bytes per item, and recall@100 of the served answer against the exact graph's on whole-catalogue rows.

    python benchmarks/catalogue_scale.py --checkpoint runs/beauty-fast/best.pt --sizes 10000 100000 1000000
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from serving_load import build_requests, commit, machine, run_load, server_call
from unirank.serving.client import RequestBuilder
from unirank.serving.context_export import export_two_stage, load_two_stage, remove_two_stage
from unirank.serving.export import OUTPUT_NAMES, export_onnx, onnx_session
from unirank.serving.item_index import INDEX_FILE, IndexOptions
from unirank.serving.model_repository import build_model_repository
from unirank.serving.server import Server, free_port

RECOMMENDED = {"hnsw": IndexOptions("hnsw", hnsw_m=32, ef_construction=100, ef_search=256),
               "ivfpq": IndexOptions("ivfpq", nprobe=64, refine=4)}


def scaled_ranker(plain, num_items: int, seed: int = 0):
    """A copy of the plain ranker whose item table holds `num_items` items (see the module doc)."""
    table = plain.item_tower.table
    trained = table[1 : plain.num_items + 1].double()
    keep = min(num_items, plain.num_items)
    rows = [table[:1], table[1 : keep + 1]]
    extra = num_items - keep
    if extra:
        mean, cov = trained.mean(0), torch.cov(trained.T)
        chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(cov.shape[0], dtype=cov.dtype))
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, extra, 1_000_000):
            z = torch.randn(min(1_000_000, extra - start), cov.shape[0], generator=gen, dtype=torch.float64)
            rows.append((mean + z @ chol.T).float())
    rows.append(table[-1:])
    scaled = copy.copy(plain)
    scaled.item_tower = copy.copy(plain.item_tower)
    scaled.item_tower._buffers = dict(plain.item_tower._buffers, table=torch.cat(rows))
    scaled.item_tower.num_items = scaled.num_items = num_items
    scaled.config = copy.copy(plain.config)
    scaled.config.num_items = num_items
    return scaled


def process_tree_rss(pid: int) -> int:
    """RSS bytes of a process and its descendants (tritonserver + the python backend stub)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rss_pages = int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            continue
        total += rss_pages * 4096
    return total


def recall_at_100(export_dir: Path, requests: list[dict], top_k: int) -> float:
    """Served two-stage top-100 vs the exact graph's, whole-catalogue rows (no candidates)."""
    exact, answer = onnx_session(export_dir / "model.onnx"), load_two_stage(export_dir, top_k)
    hits, total = 0, 0
    for request in requests:
        if (request["candidates"] != 0).any():
            continue
        want = exact.run(OUTPUT_NAMES, request)[0][0]
        got = answer(request)[0][0]
        want = set(want[want != 0].tolist())
        hits, total = hits + len(want & set(got.tolist())), total + len(want)
    return hits / max(total, 1)


def serve_and_measure(repository: Path, tokenizer, metadata, requests, args) -> dict:
    with Server(repository, free_port(), free_port(), free_port(), startup_timeout_s=600) as server:
        row = {"rss_bytes": process_tree_rss(server.process.pid)}
        call, clients = server_call(server.grpc_url, tokenizer, metadata, 16)
        for request in requests[:20]:  # warm-up
            call(0, request)
        c1 = run_load(call, requests, 1, args.requests, args.seconds)
        c16 = run_load(call, requests, 16, 4 * args.requests, args.seconds)
        for client in clients:
            client.close()
        row.update({"c1_p50_ms": c1["p50_ms"], "c1_p99_ms": c1["p99_ms"], "c1_rps": c1["throughput_rps"],
                    "c16_rps": c16["throughput_rps"], "c16_p99_ms": c16["p99_ms"],
                    "rss_after_bytes": process_tree_rss(server.process.pid)})
    return row


def measure_size(plain, tokenizer, num_items: int, kinds: list[str], args, tmp: Path) -> list[dict]:
    scaled = scaled_ranker(plain, num_items)
    export_dir = tmp / f"export_{num_items}"
    started = time.perf_counter()
    metadata = export_onnx(scaled, export_dir, top_k=args.top_k, tokenizer=tokenizer)
    export_s = time.perf_counter() - started
    requests = build_requests(RequestBuilder(tokenizer, metadata), 512, tokenizer.vocab_size)
    rows = []
    for kind in ["exact", *kinds]:
        row = {"num_items": num_items, "setup": kind}
        remove_two_stage(export_dir)
        if kind == "exact":
            row["export_s"] = round(export_s, 1)
        else:
            started = time.perf_counter()
            options = dataclasses.replace(RECOMMENDED[kind], threads=args.build_threads)
            export_two_stage(scaled, export_dir, options)
            row.update({"index_build_s": round(time.perf_counter() - started, 1),
                        "index_bytes_per_item": round((export_dir / INDEX_FILE).stat().st_size / num_items, 1),
                        "options": {k: v for k, v in vars(options).items()}})
            row["recall_at_100"] = round(recall_at_100(export_dir, requests[: args.recall_requests], args.top_k), 4)
        repo = build_model_repository(export_dir, tmp / f"repo_{num_items}_{kind}", flavours=("python",))["python"]
        row.update(serve_and_measure(repo, tokenizer, metadata, requests, args))
        row["rss_bytes_per_item"] = round(row["rss_bytes"] / num_items, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for i, setup in enumerate(dict.fromkeys(r["setup"] for r in rows)):
        mine = [r for r in rows if r["setup"] == setup]
        sizes, color = [r["num_items"] for r in mine], f"C{i}"
        lat.loglog(sizes, [r["c1_p99_ms"] for r in mine], "o-", color=color, label=f"{setup} p99")
        lat.loglog(sizes, [r["c1_p50_ms"] for r in mine], "x--", color=color, label=f"{setup} p50", alpha=0.6)
        mem.loglog(sizes, [r["rss_after_bytes"] / 2**20 for r in mine], "o-", color=color, label=setup)
    lat.set(xlabel="catalogue size (items)", ylabel="latency at c=1 (ms)", title="latency through tritonserver")
    mem.set(xlabel="catalogue size (items)", ylabel="server RSS after the load (MiB)", title="memory")
    for ax in (lat, mem):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="trained checkpoint: its item vectors seed the catalogue")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["hnsw", "ivfpq"], choices=sorted(RECOMMENDED))
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--requests", type=int, default=400, help="max requests per cell")
    parser.add_argument("--seconds", type=float, default=8.0, help="max seconds per cell")
    parser.add_argument("--recall-requests", type=int, default=300)
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--out", default="docs/bench/catalogue_scale.json")
    parser.add_argument("--plot", default="docs/bench/catalogue_scale.png")
    args = parser.parse_args()

    from unirank.training.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    loaded = load_checkpoint(args.checkpoint)
    plain = loaded.ranker.to_plain().eval()
    rows = []
    with tempfile.TemporaryDirectory(prefix="unirank-scale-") as tmp:
        for size in args.sizes:
            rows += measure_size(plain, loaded.tokenizer, size, args.kinds, args, Path(tmp))
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(), "machine": machine(),
              "model": f"{args.checkpoint}: {plain.num_items} trained items, dim {plain.config.dim}, "
                       f"similarity {plain.config.similarity}",
              "synthetic_items": "Gaussian with the empirical mean and covariance of the trained item vectors",
              "note": "2 CPU cores shared by the server, the load generator and other jobs; one ORT/FAISS thread "
                      "in the server", "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    plot(rows, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
