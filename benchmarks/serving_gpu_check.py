"""One-command GPU check of the served graph (`make serving-gpu-check`; needs onnxruntime-gpu, i.e.
`pip install -e .[cpu,serving-gpu]` instead of `serving`, and one CUDA GPU):

1. the exported model.onnx runs with ONNX Runtime's CUDA execution provider (and the session really
   uses it: no silent CPU fallback);
2. parity: CUDA vs CPU top-k scores on the same random requests of every task, max abs diff <= TOLERANCE,
   and the same filled slots;
3. latency p50/p99 per batch size on CUDA and on CPU.

    python benchmarks/serving_gpu_check.py [--checkpoint runs/x/best.pt] [--out docs/bench/serving/serving_gpu_check.json]

Without --checkpoint a random-init ranker of the Beauty size (12,000 items, d=64, top-100) is exported.
Writes JSON with command, machine, commit and every number; exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import commit, machine, random_ranker  # noqa: E402

from unirank.serving.onnx_graph import export_onnx, onnx_session

from unirank.serving.metadata import ExportMetadata, OUTPUT_NAMES  # noqa: E402
from unirank.serving.synthetic_requests import random_batches  # noqa: E402

TOLERANCE = 1e-3  # fp32 on CUDA vs CPU: reduction order only
BATCH_SIZES = (1, 8, 64)


def export(checkpoint: str | None, out: Path) -> Path:
    if checkpoint:
        from unirank.serving.export import export_model

        export_model(checkpoint, out, top_k=100)
    else:
        ranker, _ = random_ranker(num_items=12_000, dim=64, max_history=50)
        export_onnx(ranker.to_plain(), out, top_k=100)
    return out / "model.onnx"


def latency_ms(session, feed, repeats: int = 200) -> dict:
    session.run(OUTPUT_NAMES, feed)  # warm-up (CUDA kernels, arena)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(OUTPUT_NAMES, feed)
        times.append((time.perf_counter() - started) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--out", default="docs/bench/serving/serving_gpu_check.json")
    args = parser.parse_args()
    import onnxruntime as ort

    report = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "commit": commit(),
              "providers_available": ort.get_available_providers(), "checks": {}}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("CUDAExecutionProvider not available (install onnxruntime-gpu, not onnxruntime)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export(args.checkpoint, Path(tmp))
        metadata = ExportMetadata.load(Path(tmp) / "export.json")
        cpu = onnx_session(onnx_path)
        cuda = onnx_session(onnx_path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
        report["checks"]["cuda_session_providers"] = cuda.get_providers()
        worst = 0.0
        for feed in random_batches(metadata, vocab_size=100, requests=512, batch_size=64):
            (cpu_ids, cpu_scores), (gpu_ids, gpu_scores) = cpu.run(OUTPUT_NAMES, feed), cuda.run(OUTPUT_NAMES, feed)
            if not np.array_equal(cpu_ids == 0, gpu_ids == 0):
                report["checks"]["parity"] = "filled slots differ"
                break
            finite = np.isfinite(cpu_scores)
            worst = max(worst, float(np.abs(cpu_scores[finite] - gpu_scores[finite]).max(initial=0.0)))
        report["checks"].setdefault("parity", "ok" if worst <= TOLERANCE else f"max abs diff {worst:.3g} > {TOLERANCE}")
        report["max_abs_diff"] = worst
        report["latency_ms"] = {}
        for size in BATCH_SIZES:
            feed = random_batches(metadata, vocab_size=100, requests=size, batch_size=size, seed=size)[0]
            report["latency_ms"][f"batch {size}"] = {"cuda": latency_ms(cuda, feed), "cpu": latency_ms(cpu, feed)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    ok = report["checks"]["parity"] == "ok" and report["checks"]["cuda_session_providers"][0] == "CUDAExecutionProvider"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
