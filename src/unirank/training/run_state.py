"""What a resumable training checkpoint holds besides the weights: the loop's position and RNGs
(trainer.json) and the optimizer's state keyed by parameter name (so DCP can reshard it).
The files themselves are training/sharded_checkpoint.py's."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class RunState:
    epoch: int = 1  # the epoch being trained (or next)
    batches_done: int = 0  # of that epoch
    epoch_rng: dict | None = None  # data-order RNG at the epoch's start
    step: int = 0
    best: float = -1.0
    best_epoch: int = 0
    best_checkpoint: str | None = None  # the committed checkpoint of the best epoch (sharded tables)
    bad_rounds: int = 0
    history: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # global loss per step
    task_losses: list = field(default_factory=list)
    samples: int = 0
    train_seconds: float = 0.0
    resumed_from: list = field(default_factory=list)
    validation: dict | None = None  # the best epoch's validation metrics
    finished: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunState":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of the weights the trainer's optimizer owns, names relative to the ranker
    (the same names in one process and under DMP); tables with a fused in-backward optimizer are
    FBGEMM's and are left out."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or hasattr(p, "_in_backward_optimizers"):
            continue
        out[name[name.index("ranker.") + len("ranker."):] if "ranker." in name else name] = p
    return out


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, dict]:
    """{parameter name: its state} with the live state tensors (DCP saves them, and loads into them),
    created as zeros first where the optimizer has none yet (AdamW's own lazy initial state)."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            out[names[id(p)]] = state
    return out


def rng_state(device: torch.device) -> dict:
    out = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
