"""Helpers for the torchrun tests: tiny synthetic runs (dropout 0 so N ranks compute exactly the
1-rank step), one thread per rank, niced (the CI machine has 2 cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TINY = ["model.dim=16", "model.num_heads=2", "model.dropout=0.0", "model.max_history=20",
        "data.synthetic.num_users=120", "data.synthetic.num_items=80", "train.batch_size=16",
        "train.max_epochs=2", "train.eval_users=60", "train.patience=5", "train.threads=1"]
# every CPU sharding type at once on 2 ranks: item_id split in 2 column blocks, word in 4
MIXED_PLAN = ["distributed.tables.item_id.sharding_types=[table_column_wise]", "distributed.tables.item_id.min_partition=8",
              "distributed.tables.word.sharding_types=[column_wise]", "distributed.tables.word.min_partition=4",
              "distributed.tables.attribute.sharding_types=[table_wise]"]


def torchrun_cmd(nproc: int, out: Path, *overrides: str, flags: tuple[str, ...] = ()) -> list[str]:
    return ["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "unirank.training.distributed", "--config", "quickstart", "--quiet",
            *flags, *TINY, f"train.out_dir={out}", *overrides]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(nproc: int, out: Path, *overrides: str, flags: tuple[str, ...] = (), check: bool = True,
             timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(nproc, out, *overrides, flags=flags), env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def result(out: Path) -> dict:
    return json.loads((out / "distributed_result.json").read_text())
