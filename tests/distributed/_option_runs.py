"""Run under torchrun by test_distributed.py: one short run per training option on this world size,
in one process group (so TorchRec is imported and the group formed once). argv: OUT_DIR TEACHER_RUN."""
from __future__ import annotations

import sys

import torch.distributed as dist

from _dist_helpers import TINY
from test_options import VARIANTS, variant_overrides

from unirank.config import load_config
from unirank.training.train import train


def main(out: str, teacher: str) -> None:
    dist.init_process_group("gloo")
    for name in VARIANTS:
        cfg = load_config("quickstart", TINY + variant_overrides(name, teacher) + [f"train.out_dir={out}/{name}"])
        train(cfg, quiet=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
