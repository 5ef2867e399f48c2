"""Serving load benchmark: latency percentiles and throughput at several concurrencies.

Same single-row requests (mixed tasks, built by the typed client) through
  torch      PyTorch eager, in process (the export wrapper on the plain model)
  ort        ONNX Runtime, in process (the exported model.onnx)
  triton     the bundled tritonserver over gRPC, dynamic batching on
  triton-nb  the same without dynamic batching (one execution per request)
  triton-pa  the dynamic-batching server driven by Triton's own perf_analyzer (`make perf-tools`)
             on the same requests, padded to the served widths; it reports the server-side split
             (queue, input, compute, output) beside the client's percentiles
Each in-process runtime and the server model use one intra-op thread; the load generator runs on
the same machine. Every cell is bounded by --requests and --seconds; `--setups` picks setups. A cell
records its percentiles per task too (`by_task`) and the 1-minute load average at its end (the
machine may be shared).

    python benchmarks/serving_load.py                       # random-init model of realistic size
    python benchmarks/serving_load.py --checkpoint runs/x/best.pt --out docs/bench/serving/serving_load.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from unirank.model.request import INPUT_NAMES
from unirank.model.tokenizer import WordTokenizer
from unirank.serving.client import RankerClient, RequestBuilder, widths_from_server, wire_arrays
from unirank.serving.metadata import OUTPUT_NAMES, ExportMetadata
from unirank.serving.onnx_graph import TopKRanker, export_onnx, onnx_session
from unirank.serving.request_arrays import TASK_IDS
from unirank.serving.model_repository import build_model_repository
from unirank.serving.server import Server, free_port
from unirank.serving.synthetic_requests import random_request


def random_ranker(num_items: int, dim: int, max_history: int, num_words: int = 2000):
    """A randomly initialised UnifiedRanker of the given size (latency does not depend on training)."""
    from unirank.model.catalogue import Catalogue
    from unirank.model.ranker import RankerConfig, UnifiedRanker

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    attributes = [[]] + [rng.integers(0, 200, size=3).tolist() for _ in range(num_items)]
    words = [[]] + [rng.integers(2, num_words, size=8).tolist() for _ in range(num_items)]
    config = RankerConfig(num_items=num_items, num_attributes=200, num_words=num_words, dim=dim,
                          max_history=max_history, max_query_len=16)
    tokenizer = WordTokenizer([f"w{i}" for i in range(num_words - 2)])
    return UnifiedRanker(config, Catalogue(attributes, words)).eval(), tokenizer


SETUPS = ("torch", "ort", "triton", "triton-nb", "triton-pa")
PLAIN_WORDS = ("red", "nail", "polish", "shampoo", "hair", "care", "lipstick", "cream", "oil", "brush", "eye", "skin")


def build_requests(builder: RequestBuilder, count: int, vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Mixed tasks, as the typed client would send them (bucketed lengths)."""
    rng = np.random.default_rng(seed)
    md = builder.metadata
    words = getattr(builder.tokenizer, "words", None)  # a word vocabulary; word pieces read any text
    requests = []
    for i in range(count):
        row = random_request(rng, i % 3, md.num_items, vocab, md.max_history, md.max_query_len)
        query_text = " ".join(words[t - 2] if words is not None else PLAIN_WORDS[t % len(PLAIN_WORDS)]
                              for t in row["query"][0])
        requests.append(builder.build(i % 3, row["history"][0].tolist(), query_text, int(row["source_item"][0]),
                                      row["candidates"][0].tolist() or None))
    return requests


def run_load(call, requests, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """`concurrency` threads call `call(worker, request)` until max_requests or max_seconds."""
    latencies: list[float] = []
    tasks: list[int] = []  # the task of each answered request (its first row)
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + max_seconds

    def worker(index: int):
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                call(index, requests[i % len(requests)])
            except Exception as err:  # counted and reported: a load cell must show its failures
                with lock:
                    errors.append(f"{type(err).__name__}: {err}"[:200])
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                tasks.append(int(requests[i % len(requests)]["task"].flat[0]))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    percentiles = {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) if len(ms) else None for q in (50, 90, 99)}
    by_task = {TASK_IDS[t]: {f"p{q}_ms": round(float(np.percentile(ms[np.array(tasks) == t], q)), 3) for q in (50, 99)}
               for t in sorted(set(tasks))}
    return {"requests": len(ms), "errors": len(errors), "first_errors": errors[:3], "seconds": round(wall, 3), "by_task": by_task,
            "throughput_rps": round(len(ms) / wall, 1), **percentiles, "load_average_1m": round(os.getloadavg()[0], 2)}


def in_process_calls(plain, session):
    def torch_call(_, request):
        with torch.no_grad():
            plain(*(torch.from_numpy(request[n]) for n in INPUT_NAMES))

    def ort_call(_, request):
        session.run(OUTPUT_NAMES, request)

    return {"torch": torch_call, "ort": ort_call}


def server_call(url: str, tokenizer, metadata, concurrency: int):
    widths = widths_from_server(url)  # the python flavour's fixed sequence widths
    clients = [RankerClient(url, tokenizer, metadata, timeout_s=30, widths=widths) for _ in range(concurrency)]
    return (lambda worker, request: clients[worker].rank(request)), clients


def execution_counts(url: str) -> tuple[int, int]:
    """(inference_count, execution_count) of the model: their ratio is the mean executed batch size."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics("unirank", as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def perf_analyzer_data(requests, widths: dict[str, int], path: Path) -> None:
    """perf_analyzer's --input-data file: one entry per single-row request, each tensor as the
    client sends it (client.wire_arrays: padded to the served fixed widths) without the batch
    dimension."""
    entries = [{name: {"content": value[0].tolist(), "shape": list(value.shape[1:])}
                for name, value in wire_arrays(request, widths).items()} for request in requests]
    path.write_text(json.dumps({"data": entries}))


PA_COLUMNS = {"Inferences/Second": "throughput_rps", "p50 latency": "p50_us", "p90 latency": "p90_us",
              "p99 latency": "p99_us", "Client Send": "client_send_us", "Network+Server Send/Recv": "network_us",
              "Server Queue": "server_queue_us", "Server Compute Input": "server_input_us",
              "Server Compute Infer": "server_infer_us", "Server Compute Output": "server_output_us",
              "Client Recv": "client_recv_us"}


def run_perf_analyzer(binary: str, url: str, data: Path, concurrency: int, seconds: float, work: Path) -> dict:
    """One perf_analyzer measurement at `concurrency` (gRPC, batch 1 per request; perf_analyzer
    repeats windows of `seconds` until three agree within 20% on mean latency); latencies in ms."""
    out = work / f"pa_c{concurrency}.csv"
    command = [binary, "-m", "unirank", "-u", url, "-i", "grpc", "--input-data", str(data), "-b", "1",
               "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "time_windows",
               "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "20", "--max-trials", "20",
               "--verbose-csv", "-f", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60 + 25 * seconds)
    if done.returncode != 0 or not out.exists():
        return {"errors": 1, "first_errors": [(done.stdout + done.stderr)[-400:]], "p50_ms": None, "command": " ".join(command)}
    row = next(csv.DictReader(out.read_text().splitlines()))
    values = {key: float(row[column]) for column, key in PA_COLUMNS.items() if row.get(column)}
    result = {"throughput_rps": round(values.pop("throughput_rps"), 1), "errors": 0,
              **{f"p{q}_ms": round(values.pop(f"p{q}_us") / 1e3, 3) for q in (50, 90, 99)},
              "breakdown_ms": {k[:-3]: round(v / 1e3, 3) for k, v in values.items()},
              "load_average_1m": round(os.getloadavg()[0], 2), "command": " ".join(command)}
    return result


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__, "platform": platform.platform()}


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/unirank/serving", "src/unirank/model", "benchmarks"], capture_output=True, text=True).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(results: list[dict], concurrencies: list[int]) -> str:
    lines = ["| setup | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
             "| --- | " + " | ".join("---" for _ in concurrencies) + " |"]
    for setup in dict.fromkeys(r["setup"] for r in results):
        cells = []
        for c in concurrencies:
            r = next(r for r in results if r["setup"] == setup and r["concurrency"] == c)
            batch = f", batch {r['mean_batch_size']:.1f}" if "mean_batch_size" in r else ""
            errors = f", **{r['errors']} errors**" if r.get("errors") else ""
            if r["p50_ms"] is None:
                cells.append(f"no answer{errors}")
                continue
            cells.append(f"{r['throughput_rps']:.0f} req/s, p50 {r['p50_ms']:.2f} / p90 {r['p90_ms']:.2f} / p99 {r['p99_ms']:.2f} ms{batch}{errors}")
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="trained checkpoint (default: random-init model of --num-items)")
    parser.add_argument("--num-items", type=int, default=12_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-history", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=1500, help="max requests per cell")
    parser.add_argument("--seconds", type=float, default=5.0, help="max seconds per cell")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS), help="which setups to run")
    parser.add_argument("--instances", type=int, default=1, help="model instances of the served setups")
    parser.add_argument("--pa-seconds", type=float, default=5.0, help="perf_analyzer measurement window")
    parser.add_argument("--perf-analyzer", default=shutil.which("perf_analyzer"),
                        help="perf_analyzer binary for the triton-pa setup (make perf-tools installs it)")
    parser.add_argument("--out", default="docs/bench/serving/serving_load.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    load_start = list(os.getloadavg())  # the machine may be shared: the load beside the numbers
    if args.checkpoint:
        from unirank.training.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.checkpoint)
        ranker, tokenizer, model = loaded.ranker, loaded.tokenizer, args.checkpoint
    else:
        ranker, tokenizer = random_ranker(args.num_items, args.dim, args.max_history)
        model = f"random-init UnifiedRanker num_items={args.num_items} dim={args.dim} max_history={args.max_history}"
    plain = TopKRanker(ranker.to_plain(), args.top_k).eval()
    results = []
    with tempfile.TemporaryDirectory(prefix="unirank-bench-") as tmp:
        export_dir = Path(tmp) / "export"
        metadata: ExportMetadata = export_onnx(plain.ranker, export_dir, top_k=args.top_k, tokenizer=tokenizer)
        builder = RequestBuilder(tokenizer, metadata)
        requests = build_requests(builder, 512, tokenizer.vocab_size)
        calls = in_process_calls(plain, onnx_session(export_dir / "model.onnx", threads=1))
        for setup, call in calls.items():
            if setup not in args.setups:
                continue
            for c in args.concurrency:
                results.append({"setup": setup, "concurrency": c, **run_load(call, requests, c, args.requests, args.seconds)})
                print(results[-1], flush=True)
        if "triton-pa" in args.setups and not args.perf_analyzer:
            raise SystemExit("triton-pa needs perf_analyzer: run `make perf-tools` or pass --perf-analyzer PATH")
        for setup, batching in (("triton", True), ("triton-nb", False), ("triton-pa", True)):
            if setup not in args.setups:
                continue
            repo = build_model_repository(export_dir, Path(tmp) / setup, dynamic_batching=batching, flavours=("python",),
                                          instance_count=args.instances)
            with Server(repo["python"], free_port(), free_port(), free_port()) as server:
                if setup == "triton-pa":
                    data = Path(tmp) / "perf_analyzer_data.json"
                    perf_analyzer_data(requests[:64], widths_from_server(server.grpc_url), data)
                    for c in args.concurrency:
                        before = execution_counts(server.grpc_url)
                        row = run_perf_analyzer(args.perf_analyzer, server.grpc_url, data, c, args.pa_seconds, Path(tmp))
                        inferences, executions = (a - b for a, b in zip(execution_counts(server.grpc_url), before))
                        results.append({"setup": setup, "concurrency": c, **row, "server_requests": inferences,
                                        "mean_batch_size": round(inferences / max(executions, 1), 2)})
                        print(results[-1], flush=True)
                    continue
                for c in args.concurrency:
                    call, clients = server_call(server.grpc_url, tokenizer, metadata, c)
                    call(0, requests[0])  # warm-up
                    before = execution_counts(server.grpc_url)
                    row = {"setup": setup, "concurrency": c, **run_load(call, requests, c, args.requests, args.seconds)}
                    inferences, executions = (a - b for a, b in zip(execution_counts(server.grpc_url), before))
                    results.append({**row, "mean_batch_size": round(inferences / max(executions, 1), 2)})
                    for client in clients:
                        client.close()
                    print(results[-1], flush=True)
    table = markdown(results, args.concurrency)
    print(table)
    package = str(Path(__import__("unirank").__file__).parent)  # the code measured (PYTHONPATH may point elsewhere)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(), "package": package,
              "machine": machine(),
              "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
              "model": model, "top_k": args.top_k, "instances": args.instances, "results": results, "markdown": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
