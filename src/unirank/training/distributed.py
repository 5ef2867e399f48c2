"""Where the one training loop (training/train.py) runs: the process group, the device, and the
TorchRec sharding of the item tower's embedding tables (docs/DISTRIBUTED.md).

* One process (`unirank train`) has no process group: the tables are the plain-PyTorch collection
  of model/sparse_features.py and nothing here imports TorchRec.
* Under torchrun (`unirank train --nproc-per-node N`, any N) the collection is replaced by a TorchRec
  EmbeddingBagCollection with the same tables and weights, the planner shards it
  (DistributedModelParallel; per-table ParameterConstraints from `distributed.*`) and the dense part
  is data-parallel (DDP inside DMP).
* Table optimizers (`distributed.sparse_optimizer`): `adamw` (default) gives the tables the dense
  part's AdamW with its param groups and decays, so N ranks train what one process trains. On CPU
  that means data_parallel tables (TorchRec's dense kernel: the only kernel FBGEMM's CPU build pairs
  with a torch optimizer); on GPU the fused FBGEMM kernels run Adam with decoupled decay (= AdamW)
  inside the backward, for every sharding type. `adagrad` / `rowwise_adagrad` / `sgd` are FBGEMM's
  fused CPU optimizers, for model-parallel (table/column-wise) tables on CPU.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from unirank.config import Config, ConfigError

CPU_SHARDING = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
GPU_ONLY_SHARDING = ("row_wise", "table_row_wise", "grid_shard")
MODEL_PARALLEL_CPU = ("table_wise", "column_wise", "table_column_wise")
FUSED_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")
ID_TABLE = "item_id"


class DistributedError(RuntimeError):
    pass


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this process started the group, and ends it

    @property
    def sharded(self) -> bool:
        """Launched by torchrun (any world size): the tables go through TorchRec's planner."""
        return dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def stop(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible (train.device=auto picks the CPU then)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _die_with_launcher() -> None:
    """A rank ends when its launcher (torchrun's agent) does, even by SIGKILL: torchrun starts ranks in
    sessions of their own, so without this they would train on as orphans holding the out_dir."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the launcher died before the call
            os._exit(1)


def start(cfg: Config) -> Runtime:
    """The process group when torchrun launched this process (WORLD_SIZE is set), else none."""
    device = resolve_device(cfg.train.device)
    owns = False
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        _die_with_launcher()
        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"distributed.backend must be auto, gloo or nccl, got {backend!r}")
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("distributed.backend=nccl needs train.device=cuda (or auto on a GPU machine)")
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.distributed.timeout_s))
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    runtime = Runtime(device, rank, world, owns)
    want = cfg.distributed.expect_world_size
    if want is not None and want != world:
        runtime.stop()
        raise DistributedError(f"distributed.expect_world_size={want} but torchrun started {world} rank(s): "
                               "launch --nproc-per-node/--nnodes to match")
    return runtime


# ----------------------------------------------------------------------------------------------
# the sharding plan


def sharding_types(cfg: Config, table: str, device: torch.device) -> list[str]:
    """Allowed sharding types of `table`: the configured ones, checked against the device and the
    table optimizer, or (none configured) every type they allow."""
    dcfg = cfg.distributed
    tcfg = dcfg.tables.get(table)
    types = list(tcfg.sharding_types) if tcfg is not None and tcfg.sharding_types else list(dcfg.sharding_types)
    bad = [t for t in types if t not in CPU_SHARDING + GPU_ONLY_SHARDING]
    if bad:
        raise ConfigError(f"sharding types for table {table}: {bad} (choose from {CPU_SHARDING + GPU_ONLY_SHARDING})")
    cpu = device.type == "cpu"
    if cpu and any(t in GPU_ONLY_SHARDING for t in types):
        raise ConfigError(f"table {table}: {[t for t in types if t in GPU_ONLY_SHARDING]} sharding needs "
                          f"GPUs (NCCL); on CPU/gloo use {CPU_SHARDING}")
    adamw_on_cpu = cpu and dcfg.sparse_optimizer == "adamw"
    if adamw_on_cpu and any(t != "data_parallel" for t in types):
        raise ConfigError(f"table {table}: {types} sharding on CPU needs a fused table optimizer "
                          f"(distributed.sparse_optimizer in {FUSED_OPTIMIZERS}); with adamw the CPU tables are "
                          "data_parallel (TorchRec's dense kernel is the one that takes a torch optimizer)")
    if not types:
        types = (["data_parallel"] if adamw_on_cpu else list(MODEL_PARALLEL_CPU) if cpu
                 else list(MODEL_PARALLEL_CPU + ("row_wise", "table_row_wise")))
    return types


def constraints(cfg: Config, device: torch.device, tables: list[str]) -> dict:
    from torchrec.distributed.planner.types import ParameterConstraints

    unknown = sorted(set(cfg.distributed.tables) - set(tables))
    if unknown:
        raise ConfigError(f"distributed.tables: unknown table(s) {unknown}; the tables are {tables}")
    if cfg.distributed.sparse_optimizer not in ("adamw",) + FUSED_OPTIMIZERS:
        raise ConfigError(f"distributed.sparse_optimizer must be one of {('adamw',) + FUSED_OPTIMIZERS}, "
                          f"got {cfg.distributed.sparse_optimizer!r}")
    out = {}
    for table in tables:
        tcfg = cfg.distributed.tables.get(table)
        out[table] = ParameterConstraints(sharding_types=sharding_types(cfg, table, device),
                                          min_partition=tcfg.min_partition if tcfg is not None else None)
    return out


def table_rows(cfg: Config, specs) -> dict[str, tuple[int, int]]:
    """{table: (rows the model needs, rows to allocate)}; capacity below the need is an error."""
    out = {}
    for spec in specs:
        want = cfg.distributed.tables[spec.name].rows if spec.name in cfg.distributed.tables else None
        if want is not None and want < spec.rows:
            raise ConfigError(f"distributed.tables.{spec.name}.rows={want} is below the {spec.rows} rows the data needs")
        out[spec.name] = (spec.rows, want or spec.rows)
    return out


def table_decay(cfg: Config, table: str) -> float:
    """The AdamW decay a table gets: the id table's own (train.id_weight_decay) or train.weight_decay."""
    if table == ID_TABLE and cfg.train.id_weight_decay is not None:
        return cfg.train.id_weight_decay
    return cfg.train.weight_decay


def _table_optimizers(cfg: Config, ebc, device: torch.device) -> None:
    """Fused optimizers, set on the tables before sharding (TorchRec's apply_optimizer_in_backward)."""
    import torchrec.optim as trec_optim
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    name = cfg.distributed.sparse_optimizer
    if name == "adamw":
        if device.type == "cpu":
            return  # data_parallel tables: their weights join the dense AdamW
        from fbgemm_gpu.split_embedding_configs import WeightDecayMode

        for table, bag in ebc.embedding_bags.items():  # one fused group per decay
            apply_optimizer_in_backward(trec_optim.Adam, [bag.weight], {
                "lr": cfg.train.lr, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999,
                "weight_decay": table_decay(cfg, table), "weight_decay_mode": WeightDecayMode.DECOUPLED})
        return
    cls = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": trec_optim.RowWiseAdagrad, "sgd": torch.optim.SGD}[name]
    args = {"lr": cfg.distributed.sparse_lr} | ({"eps": 1e-8} if cls is torch.optim.Adagrad else {})
    apply_optimizer_in_backward(cls, ebc.parameters(), args)


def _torchrec_collection(specs, rows: dict[str, tuple[int, int]], dim: int):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    tables = [EmbeddingBagConfig(name=s.name, embedding_dim=s.dim, num_embeddings=rows[s.name][1],
                                 feature_names=list(s.features), pooling=pooling[s.pooling],
                                 init_fn=partial(nn.init.normal_, std=dim ** -0.5)) for s in specs]
    return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def shard(module: nn.Module, cfg: Config, runtime: Runtime):
    """(DMP-wrapped `module`, plan summary): `module.ranker`'s tables as a TorchRec collection on the
    meta device (only each rank's shards are ever allocated), planned and sharded, with the weights
    the module had (capacity tables beyond what the data needs keep their own normal init)."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.sharding_plan import get_default_sharders

    tower = module.ranker.item_tower
    device = runtime.device
    rows = table_rows(cfg, tower.table_specs)
    init = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for name, (need, want) in rows.items():
        if need != want:
            init.pop(f"ranker.item_tower.ebc.embedding_bags.{name}.weight")
    tower.ebc = _torchrec_collection(tower.table_specs, rows, tower.dim)
    _table_optimizers(cfg, tower.ebc, device)
    budget = cfg.distributed.memory_budget_gb
    cap = None if budget is None else int(budget * 1024 ** 3)
    topology = Topology(world_size=runtime.world, compute_device=device.type,
                        **({"ddr_cap": cap} if device.type == "cpu" else {"hbm_cap": cap}))
    planner = EmbeddingShardingPlanner(topology=topology,
                                       constraints=constraints(cfg, device, [s.name for s in tower.table_specs]))
    try:
        plan = planner.collective_plan(module, get_default_sharders(), dist.GroupMember.WORLD)
    except PlannerError as err:
        sizes = {t: f"{w} rows" for t, (_, w) in rows.items()}
        raise DistributedError(f"no sharding plan for {runtime.world} rank(s) (tables {sizes}, per-rank budget "
                               f"{budget} GB): {str(err).splitlines()[0]}") from err
    dmp = DistributedModelParallel(module, device=device, plan=plan)
    unexpected = dmp.load_state_dict(init, strict=False).unexpected_keys
    if unexpected:
        raise DistributedError(f"initial weights do not fit the sharded model: {unexpected}")
    return dmp, plan_summary(plan)


def plan_summary(plan) -> dict[str, dict]:
    """{table: {sharding_type, compute_kernel, ranks, shards: [[row0, col0, rows, cols, rank], ...]}}."""
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            shards = []
            if ps.sharding_spec is not None:
                for s in ps.sharding_spec.shards:
                    shards.append([*s.shard_offsets, *s.shard_sizes, s.placement.rank()])
            out[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                          "ranks": ps.ranks, "shards": shards}
    return out


def fused_optimizer(model):
    """The DMP's in-backward table optimizer, or None (no fused tables)."""
    fused = getattr(model, "fused_optimizer", None)
    return fused if fused is not None and fused.params else None


# ----------------------------------------------------------------------------------------------
# memory


def _proc_status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _local_bytes(t) -> int:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(t, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def memory_report(model, optimizer_state: dict, rank: int) -> dict:
    """Bytes of embedding weights and their optimizer state held by THIS rank, and its RSS."""
    weights = sum(_local_bytes(v) for k, v in model.state_dict().items() if ".ebc." in k)
    state = sum(_local_bytes(v) for k, s in optimizer_state.items() if ".ebc." in k for v in s.values())
    return {"rank": rank, "embedding_weights_mb": round(weights / 2 ** 20, 1),
            "embedding_optimizer_mb": round(state / 2 ** 20, 1),
            "rss_mb": round(_proc_status_kb("VmRSS") / 1024, 1), "peak_rss_mb": round(_proc_status_kb("VmHWM") / 1024, 1)}
