"""Sparse features of the item tower and the tables that pool them, in plain PyTorch.

`JaggedFeatures` is the jagged batch (keys, concatenated values, per-key lengths of one stride):
the same layout as TorchRec's KeyedJaggedTensor, which `to_kjt()` wraps without a copy when the
tables are sharded. `EmbeddingTables` is the unsharded collection: one weight per table, several
features may share a table, SUM or MEAN pooling. Its state-dict keys (`embedding_bags.<table>.weight`)
and table descriptions are TorchRec's EmbeddingBagCollection's, so the trainer swaps it for a TorchRec
collection only when the planner shards it (training/distributed.py), and checkpoints move between
the two. Nothing here imports TorchRec until a KJT is asked for: the unsharded model runs where
TorchRec and FBGEMM are not installed (a plain CUDA machine).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unirank.kernels.dispatch import model_impl
from unirank.kernels.embedding_bag import multi_embedding_bag

POOLINGS = ("sum", "mean")


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    features: tuple[str, ...]
    pooling: str  # "sum" | "mean"


@dataclass
class JaggedFeatures:
    """`lengths` [len(keys) * stride] (key-major), `values` the ids of every bag in that order."""

    keys: list[str]
    values: torch.Tensor
    lengths: torch.Tensor
    stride: int
    _offsets: torch.Tensor | None = field(default=None, repr=False)

    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = F.pad(torch.cumsum(self.lengths, 0), (1, 0))
        return self._offsets

    def per_key(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{key: (values, offsets [stride + 1] from 0)} as views, no copy of the values."""
        out, offsets, s = {}, self.offsets(), self.stride
        for i, key in enumerate(self.keys):
            bag = offsets[i * s: (i + 1) * s + 1]
            out[key] = (self.values[bag[0]: bag[-1]], bag - bag[0])
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "JaggedFeatures":
        return JaggedFeatures(self.keys, self.values.to(device, non_blocking=non_blocking),
                              self.lengths.to(device, non_blocking=non_blocking), self.stride)

    def to_kjt(self):
        from torchrec import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=self.keys, values=self.values, lengths=self.lengths, stride=self.stride)


class _Table(nn.Module):
    def __init__(self, rows: int, dim: int, device: torch.device | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim, device=device))


class EmbeddingTables(nn.Module):
    """Unsharded embedding-bag collection. `forward(features)` -> {feature: pooled [stride, dim]};
    `impl`: "torch" (F.embedding_bag per feature), "triton" (kernels/embedding_bag, one launch for
    every feature) or "auto" (Triton on CUDA, torch elsewhere)."""

    def __init__(self, specs: list[TableSpec], impl: str = "auto", device: torch.device | None = None):
        super().__init__()
        for spec in specs:
            if spec.pooling not in POOLINGS:
                raise ValueError(f"table {spec.name}: pooling must be one of {POOLINGS}, got {spec.pooling!r}")
        self.specs, self.impl = list(specs), impl
        self.embedding_bags = nn.ModuleDict({s.name: _Table(s.rows, s.dim, device) for s in specs})
        self.table_of = {f: s for s in specs for f in s.features}

    def forward(self, features: JaggedFeatures) -> dict[str, torch.Tensor]:
        bags = features.per_key()
        keys = [k for k in features.keys if k in self.table_of]
        weights = [self.embedding_bags[self.table_of[k].name].weight for k in keys]
        if self._use_kernel(weights[0]):
            # MEAN over a one-id bag is its SUM, so the SUM tables (ids, semantic codes) pool as MEAN too
            pooled = multi_embedding_bag(weights, [bags[k][0] for k in keys], [bags[k][1] for k in keys],
                                         mode="mean", impl="triton")
            return dict(zip(keys, pooled))
        return {k: F.embedding_bag(bags[k][0], w, bags[k][1], mode=self.table_of[k].pooling, include_last_offset=True)
                for k, w in zip(keys, weights)}

    def _use_kernel(self, weight: torch.Tensor) -> bool:
        return self.impl != "torch" and model_impl(self.impl, weight) == "triton"
