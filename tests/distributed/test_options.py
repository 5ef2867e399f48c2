"""Every train.* option (and the lexical match's field) at world size 2: each is accepted, gives
what one process gives (same losses, same validation), and changes the run (so it cannot be
silently ignored)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _dist_helpers import TINY, env, result

from unirank.config import load_config
from unirank.training.train import train

SHORT = ["train.max_epochs=1", "train.eval_every=1"]
# name: (overrides, the variant it must differ from, what differs: the losses or the validation)
VARIANTS = {
    "base": ([], None, None),
    "weight_decay": (["train.weight_decay=0.5"], "base", "losses"),
    "id_weight_decay": (["train.weight_decay=0.5", "train.id_weight_decay=2.0"], "weight_decay", "losses"),
    "id_dropout": (["model.id_dropout=0.5"], "base", "losses"),
    "num_negatives": (["train.num_negatives=16"], "base", "losses"),
    "task_weights": (["train.task_weights=[1.0,0.5,3.0]"], "base", "losses"),
    "tasks": (["train.tasks=[prequery,search]"], "base", "losses"),
    "lr_schedule": (["train.lr_schedule=cosine", "train.warmup_steps=2"], "base", "losses"),
    # the quickstart's lexical match (attribute names) is in every variant; these change its field
    "lexical_title": (["model.lexical=title+names"], "base", "losses"),
    "lexical_none": (["model.lexical=none"], "base", "losses"),
}


def variant_overrides(name: str, teacher: str) -> list[str]:
    return SHORT + [o.replace("TEACHER", teacher) for o in VARIANTS[name][0]]


@pytest.fixture(scope="module")
def option_runs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """{variant: (1-process result, 2-rank result)}."""
    base = tmp_path_factory.mktemp("options")
    teacher = base / "teacher"
    train(load_config("quickstart", TINY + SHORT + [f"train.out_dir={teacher}", "train.seed=7"]), quiet=True)
    here = Path(__file__).parent
    proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(here / "_option_runs.py"), str(base / "two"), str(teacher)],
                          env=env(here), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    runs = {}
    for name in VARIANTS:
        one = base / "one" / name
        train(load_config("quickstart", TINY + variant_overrides(name, str(teacher)) + [f"train.out_dir={one}"]),
              quiet=True)
        runs[name] = (result(one), result(base / "two" / name))
    return runs


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "base"])
def test_option_works_on_two_ranks_as_in_one_process_and_changes_the_run(option_runs, name):
    one, two = option_runs[name]
    assert two["world_size"] == 2 and one["world_size"] == 1
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    for key, value in one["history"][-1].items():
        if "/" in key or key == "score":
            assert abs(two["history"][-1][key] - value) <= 1e-6, (key, value, two["history"][-1][key])
    _, other, signal = VARIANTS[name]
    reference = option_runs[other][0]
    if signal == "losses":
        assert np.abs(np.array(one["losses"]) - np.array(reference["losses"])).max() > 1e-4
    else:
        metrics = [k for k in one["history"][-1] if "/" in k]
        assert any(abs(one["history"][-1][k] - reference["history"][-1][k]) > 1e-9 for k in metrics)
