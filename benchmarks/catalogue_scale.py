"""Catalogue scale: exact in-graph scoring vs two-stage retrieval (context graph + item index) as the
catalogue grows, through the real tritonserver.

For each catalogue size N the trained model's item table is extended to N items: the trained vectors
first, then synthetic ones drawn from a Gaussian with the empirical mean and covariance of the
trained item vectors (ids 1..N; the OOV row stays the trained one). Three steps, so that only the
serving measurement needs the quiet machine:

  build   exports (the exact graph, with external data past 2 GB; the context graph + item table) and
          indexes into --cache; sweeps each index's search knob (hnsw ef_search, ivfpq nprobe) for
          recall@100 of the index against the exact top-100 of the same context vectors, and keeps
          the smallest setting that reaches --target-recall (the largest tried if none does);
  serve   per setup, tritonserver on its repository: latency p50/p99 at c=1, throughput at c=16
          (single-row mixed-task requests from the typed client), the server's RSS (tritonserver +
          python stub) before and after the load; one JSON row per (size, setup) in --cache;
  report  the rows of every size into one JSON (+ a log-log plot of latency and memory).

    python benchmarks/catalogue_scale.py build --checkpoint runs/beauty/best.pt --sizes 10000 1000000
    python benchmarks/catalogue_scale.py serve --sizes 10000 1000000      # inside a quiet window
    python benchmarks/catalogue_scale.py report --sizes 10000 1000000
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from serving_load import build_requests, commit, machine, run_load, server_call
from unirank.serving.client import RequestBuilder
from unirank.model.tokenizer import load_tokenizer
from unirank.serving.context_export import export_context_onnx, item_vectors
from unirank.serving.onnx_graph import export_onnx, onnx_session
from unirank.serving.item_index import INDEX_FILE, IndexOptions, ItemIndex
from unirank.serving.metadata import METADATA_FILE, MODEL_FILE, TOKENIZER_FILE, ExportMetadata, external_data_files
from unirank.serving.model_repository import build_model_repository
from unirank.serving.server import Server, free_port

# Setups: index options and the search knob swept (values tried, smallest first).
SETUPS = {
    "hnsw": (IndexOptions("hnsw", hnsw_m=32, ef_construction=100), "ef_search", (64, 128, 256, 512, 1024)),
    "ivfpq_refine": (IndexOptions("ivfpq", refine=10), "nprobe", (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    "ivfpq": (IndexOptions("ivfpq"), "nprobe", (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
}
REQUESTS, TOP = 512, 100


def scaled_ranker(plain, num_items: int, seed: int = 0):
    """A copy of the plain ranker whose item table holds `num_items` items (see the module doc);
    the plain ranker is left as it was."""
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
    scaled._modules = dict(plain._modules)
    scaled.item_tower = copy.copy(plain.item_tower)
    scaled.item_tower._buffers = dict(plain.item_tower._buffers, table=torch.cat(rows))
    scaled.item_tower.num_items = scaled.num_items = num_items
    scaled.config = dataclasses.replace(plain.config, num_items=num_items)
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


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    os.link(source, target)


def _dir_bytes(directory: Path, names) -> int:
    return sum((directory / n).stat().st_size for n in names if (directory / n).exists())


def build_size(plain, tokenizer, num_items: int, setups: list[str], args) -> None:
    """cache/<N>/{exact, two_stage, <setup>}: export dirs + repositories; cache/<N>/build.json."""
    root = Path(args.cache) / str(num_items)
    info_path = root / "build.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"num_items": num_items, "setups": {}}
    scaled = scaled_ranker(plain, num_items)
    exact = root / "exact"
    if "exact" not in info:
        started = time.perf_counter()
        export_onnx(scaled, exact, top_k=args.top_k, tokenizer=tokenizer)
        build_model_repository(exact, exact / "repository", flavours=("python",))
        files = [MODEL_FILE, *external_data_files(exact / MODEL_FILE)]
        info["exact"] = {"export_s": round(time.perf_counter() - started, 1), "files": files,
                         "graph_bytes": _dir_bytes(exact, files)}
        info_path.write_text(json.dumps(info, indent=2))
    base = root / "two_stage"
    if "two_stage" not in info:
        started = time.perf_counter()
        export_context_onnx(scaled, base)
        info["two_stage"] = {"export_s": round(time.perf_counter() - started, 1),
                             "context_onnx_bytes": (base / "context.onnx").stat().st_size,
                             "item_table_bytes": (base / "item_table.npy").stat().st_size}
        info_path.write_text(json.dumps(info, indent=2))
    vectors = item_vectors(scaled)
    metadata = ExportMetadata.load(exact / METADATA_FILE)
    queries, exact_ids = None, None
    for setup in setups:
        if setup in info["setups"]:
            continue
        if queries is None:
            queries = _whole_catalogue_contexts(base, tokenizer, metadata)
            exact_ids = _exact_top(vectors, queries, scaled.config.similarity)
        options, knob, values = SETUPS[setup]
        nlist = args.nlist or int(4 * np.sqrt(num_items))
        options = dataclasses.replace(options, threads=args.build_threads, nlist=nlist if options.kind == "ivfpq" else 0,
                                      train_size=max(options.train_size, 40 * nlist))
        started = time.perf_counter()
        index = ItemIndex.build(vectors, scaled.config.similarity, scaled.config.temperature, options)
        build_s = time.perf_counter() - started
        sweep = []
        for value in values:
            index.configure(**{knob: value})
            ids, _ = index.search(queries, TOP)
            sweep.append({knob: value, "recall_at_100": round(_recall(ids, exact_ids), 4)})
            print(json.dumps({"num_items": num_items, "setup": setup, **sweep[-1]}), flush=True)
            if sweep[-1]["recall_at_100"] >= args.target_recall:
                break
        chosen = sweep[-1]
        index.meta["options"][knob] = chosen[knob]  # what the served index searches with
        index.configure(**{knob: chosen[knob]})
        directory = root / setup
        directory.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, *external_data_files(exact / MODEL_FILE), METADATA_FILE, TOKENIZER_FILE):
            _link(exact / name, directory / name)
        for name in ("context.onnx", "item_table.npy"):
            _link(base / name, directory / name)
        index.save(directory)
        del index
        build_model_repository(directory, directory / "repository", flavours=("python",))
        info["setups"][setup] = {"options": {k: v for k, v in vars(options).items()}, "knob": knob, "chosen": chosen,
                                 "sweep": sweep, "index_build_s": round(build_s, 1), "build_threads": args.build_threads,
                                 "index_bytes_per_item": round((directory / INDEX_FILE).stat().st_size / num_items, 1),
                                 "recall_queries": int(len(queries))}
        info_path.write_text(json.dumps(info, indent=2))


def _whole_catalogue_contexts(base: Path, tokenizer, metadata) -> np.ndarray:
    """Context vectors of the benchmark's requests without candidates (the rows the index answers)."""
    session = onnx_session(base / "context.onnx")
    table = np.load(base / "item_table.npy", mmap_mode="r")
    contexts = []
    for request in build_requests(RequestBuilder(tokenizer, metadata), REQUESTS, tokenizer.vocab_size):
        if not (request["candidates"] != 0).any():
            contexts.append(session.run(["context"], dict(request, item_table=table))[0][0])
    return np.stack(contexts).astype(np.float32)


def _exact_top(vectors: np.ndarray, queries: np.ndarray, similarity: str) -> np.ndarray:
    """Exact top-100 ids (1-based) by the model's similarity, in chunks of the catalogue."""
    import faiss

    if similarity == "cosine":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    _, ids = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), TOP, metric=faiss.METRIC_INNER_PRODUCT)
    return ids + 1


def _recall(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), exact_ids.tolist())]))


def serve_setup(num_items: int, setup: str, args) -> dict:
    root = Path(args.cache) / str(num_items)
    directory = root / setup
    repository = directory / "repository" / "python"
    metadata = ExportMetadata.load(directory / METADATA_FILE)
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    requests = build_requests(RequestBuilder(tokenizer, metadata), REQUESTS, tokenizer.vocab_size)
    row = {"num_items": num_items, "setup": setup, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "commit": commit(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with Server(repository, free_port(), free_port(), free_port(), startup_timeout_s=900) as server:
        row["rss_bytes"] = process_tree_rss(server.process.pid)
        call, clients = server_call(server.grpc_url, tokenizer, metadata, 16)
        for request in requests[:20]:  # warm-up
            call(0, request)
        c1 = run_load(call, requests, 1, args.requests, args.seconds)
        c16 = run_load(call, requests, 16, 4 * args.requests, args.seconds)
        for client in clients:
            client.close()
        row.update({"c1_p50_ms": c1["p50_ms"], "c1_p99_ms": c1["p99_ms"], "c1_rps": c1["throughput_rps"],
                    "c1_requests": c1.get("requests"), "c16_rps": c16["throughput_rps"], "c16_p99_ms": c16["p99_ms"],
                    "rss_after_bytes": process_tree_rss(server.process.pid)})
    row["rss_bytes_per_item"] = round(row["rss_after_bytes"] / num_items, 1)
    (root / f"serve_{setup}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row), flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4))
    for i, setup in enumerate(dict.fromkeys(r["setup"] for r in rows)):
        mine = sorted((r for r in rows if r["setup"] == setup), key=lambda r: r["num_items"])
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


def report(args) -> None:
    rows, builds = [], []
    for size in args.sizes:
        root = Path(args.cache) / str(size)
        build = json.loads((root / "build.json").read_text())
        builds.append(build)
        for serve in sorted(root.glob("serve_*.json")):
            row = json.loads(serve.read_text())
            setup = build["setups"].get(row["setup"])
            if setup:
                row.update({"index_bytes_per_item": setup["index_bytes_per_item"], "index_build_s": setup["index_build_s"],
                            setup["knob"]: setup["chosen"][setup["knob"]], "recall_at_100": setup["chosen"]["recall_at_100"]})
            rows.append(row)
    order = ["exact", *SETUPS]
    rows.sort(key=lambda r: (r["num_items"], order.index(r["setup"])))
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(), "machine": machine(),
              "build_command": builds[0].get("command"), "synthetic_items": "Gaussian with the empirical mean and "
              "covariance of the trained item vectors (beyond the trained catalogue)",
              "note": "2 CPU cores; the serve rows ran in an exclusive window (training paused); one ORT/FAISS "
                      "thread in the server; recall@100: index top-100 vs exact top-100 of the same context vectors",
              "builds": builds, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    plot(rows, Path(args.plot))
    print(markdown(rows))
    print(f"wrote {args.out} and {args.plot}")


def markdown(rows: list[dict]) -> str:
    lines = ["| items | setup | search setting | recall@100 | c=1 p50 / p99 ms | c=16 req/s | RSS after load | index B/item |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        knob = next((f"{k} {r[k]}" for k in ("ef_search", "nprobe") if k in r), "-")
        lines.append(f"| {r['num_items']:.0e} | {r['setup']} | {knob} | {r.get('recall_at_100', 1)} | "
                     f"{r['c1_p50_ms']:.2f} / {r['c1_p99_ms']:.2f} | {r['c16_rps']:.0f} | "
                     f"{r['rss_after_bytes'] / 2**20:.0f} MiB | {r.get('index_bytes_per_item', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("build", "serve", "report"))
    parser.add_argument("--checkpoint", help="build: trained checkpoint whose item vectors seed the catalogue")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--setups", nargs="+", default=["exact", *SETUPS], choices=["exact", *SETUPS])
    parser.add_argument("--cache", default="runs/scale", help="exports, indexes and per-setup rows")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--target-recall", type=float, default=0.98)
    parser.add_argument("--requests", type=int, default=400, help="serve: max requests per cell")
    parser.add_argument("--seconds", type=float, default=8.0, help="serve: max seconds per cell")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--nlist", type=int, default=0, help="build: ivfpq lists (0: 4 sqrt(N))")
    parser.add_argument("--out", default="docs/bench/serving/catalogue_scale.json")
    parser.add_argument("--plot", default="docs/bench/serving/catalogue_scale.png")
    args = parser.parse_args()
    if args.step == "report":
        return report(args)
    if args.step == "serve":
        for size in args.sizes:
            for setup in args.setups:
                if (Path(args.cache) / str(size) / setup / "repository").exists():
                    serve_setup(size, setup, args)
        return
    from unirank.training.checkpoint import load_checkpoint

    torch.set_num_threads(args.build_threads)
    loaded = load_checkpoint(args.checkpoint)
    plain = loaded.ranker.to_plain().eval()
    for size in args.sizes:
        build_size(plain, loaded.tokenizer, size, [s for s in args.setups if s != "exact"], args)
        path = Path(args.cache) / str(size) / "build.json"
        info = json.loads(path.read_text())
        info.update(command=" ".join([Path(sys.executable).name, *sys.argv]), commit=commit(),
                    model=f"{args.checkpoint}: {plain.num_items} trained items, dim {plain.config.dim}, "
                          f"similarity {plain.config.similarity}")
        path.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
