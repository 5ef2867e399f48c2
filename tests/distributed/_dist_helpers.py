"""Helpers for the rank tests: tiny synthetic runs of the quickstart model (the lexical match in the
search score included; dropout 0, so N ranks compute exactly the 1-process step), one thread per
rank, niced (the CI machine has 2 cores). Every rank imports the unirank this test process imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import unirank

TINY = ["model.dim=16", "model.num_heads=2", "model.dropout=0.0", "model.max_history=20",
        "data.synthetic.num_users=120", "data.synthetic.num_items=80", "train.batch_size=16",
        "train.max_epochs=2", "train.eval_users=60", "train.patience=5", "train.threads=1"]
# configs/quality.yaml's optimisation recipe at this size: LiGR, AdamW with its own id-table decay,
# id dropout, the cosine schedule with warm-up (the text vectors are left out: no encoder download)
QUALITY = ["model.block=ligr", "model.id_dropout=0.2", "train.weight_decay=0.1", "train.id_weight_decay=0.3",
           "train.lr_schedule=cosine", "train.warmup_steps=3"]
# every CPU model-parallel sharding type at once on 2 ranks (FBGEMM's fused Adagrad on the tables):
# item_id split in 2 column blocks, word in 4, attribute whole on one rank
MIXED_PLAN = ["distributed.sparse_optimizer=adagrad",
              "distributed.tables.item_id.sharding_types=[table_column_wise]", "distributed.tables.item_id.min_partition=8",
              "distributed.tables.word.sharding_types=[column_wise]", "distributed.tables.word.min_partition=4",
              "distributed.tables.attribute.sharding_types=[table_wise]"]


def train_cmd(nproc: int | None, out: Path, *overrides: str) -> list[str]:
    """`unirank train` as one process (nproc None) or with --nproc-per-node."""
    launch = [] if nproc is None else ["--nproc-per-node", str(nproc)]
    return ["nice", "-n", "10", sys.executable, "-m", "unirank.cli.main", "train", *launch, "--config",
            "quickstart", "--quiet", *TINY, f"train.out_dir={out}", *overrides]


def env(*paths: Path) -> dict:
    """The ranks' environment: `paths`, then the source tree of the unirank under test, ahead of
    whatever PYTHONPATH had (an installed unirank elsewhere would make "2 ranks == 1 process"
    compare two different programs)."""
    source = str(Path(unirank.__file__).resolve().parents[1])
    python_path = [*map(str, paths), source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(python_path)}


def run_train(nproc: int | None, out: Path, *overrides: str, check: bool = True,
              timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(nproc, out, *overrides), env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"unirank train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def result(out: Path) -> dict:
    return json.loads((out / "train_result.json").read_text())
