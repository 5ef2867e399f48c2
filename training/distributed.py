"""Distributed training with TorchRec: `torchrun --nproc_per_node N -m unirank.training.distributed
[--config FILE|NAME] [key=value ...]` (see docs/DISTRIBUTED.md).

* The item tower's EmbeddingBagCollection is sharded by the TorchRec planner
  (DistributedModelParallel); the sharding types allowed per table come from `distributed.*`
  (ParameterConstraints) and the plan is printed at start. The dense part (transformer, task and
  position embeddings) is data-parallel (DDP inside DMP).
* Embedding tables are updated by a fused optimizer inside their backward (TorchRec's way; on CPU
  FBGEMM offers adagrad / rowwise_adagrad / sgd, adam needs a GPU); dense parameters by AdamW as in
  single-process training.
* Data: every rank draws the SAME global batch (same seed, same batch as `unirank train`) and keeps
  rows rank, rank + W, rank + 2W, ... The loss is normalised by the GLOBAL per-task target counts
  and multiplied by W; DDP averages dense gradients over W ranks and TorchRec's pooled all-to-all
  divides embedding gradients by W as well, so both equal the gradient of the global-batch loss:
  N ranks compute the 1-rank step (up to float summation order).
* Sharded checkpoints (training/sharded_checkpoint.py): DCP, each rank writes its shards, commit by
  rename after a barrier, resumable on any world size; rank 0 consolidates the best checkpoint into
  the single-file format (<out_dir>/best.pt) for `unirank evaluate` / `unirank export`.

No TrainPipelineSparseDist: the ranker builds its KJT inside the model (ids deduplicated over
history + candidates in ItemTower.lookup), so the pipeline's rewrite cannot start the input
all-to-all from the batch; on CPU/gloo there is no second stream to overlap with anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unirank.model.ranker import NUM_TASKS, UnifiedRanker
from unirank.model.request import TASK_NAMES, Task
from unirank.training.checkpoint import CheckpointError
from unirank.training.config import Config, ConfigError, load_config, to_yaml
from unirank.training.examples import TrainBatch, TrainingExamples
from unirank.training.loss import full_softmax_cross_entropy, item_frequencies
from unirank.training import sharded_checkpoint as sc
from unirank.training.train import TASK_BY_NAME, Prepared, build_ranker, prepare, selection_score, validate

TABLES = ("item_id", "attribute", "word")
CPU_SHARDING = ("table_wise", "column_wise", "table_column_wise", "data_parallel")
GPU_ONLY_SHARDING = ("row_wise", "table_row_wise", "grid_shard")
CPU_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")


class DistributedError(RuntimeError):
    pass


def log(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# model


class RankerTrainModule(nn.Module):
    """The module DMP wraps: forward = this rank's share of the global-batch loss, so the whole
    loss runs inside DDP's forward with ONE embedding lookup per step (targets, negatives or the
    full catalogue go through the same KJT as history and source items)."""

    def __init__(self, ranker: UnifiedRanker):
        super().__init__()
        self.ranker = ranker

    def forward(self, task, history, history_lengths, query, query_lengths, source_item, targets,
                candidates, logq, task_scale, num_uniq: int, full: bool):
        r = self.ranker
        hidden, _, cand_vec = r.encode(task, history, history_lengths, query, query_lengths, source_item,
                                       extra_items=candidates)
        targets = targets[:, : hidden.shape[1] - 1]
        keep = targets > 0
        h, targets = hidden[:, 1:][keep], targets[keep]
        row_task = task.unsqueeze(1).expand_as(keep)[keep]
        if full:  # candidates = ids 1..n (never padding / OOV): column = id - 1, as in loss.softmax_loss
            per_position = full_softmax_cross_entropy(r, h, cand_vec, targets - 1)
        else:
            logits = r.similarity(h, cand_vec) - logq.unsqueeze(0)
            labels = torch.searchsorted(candidates[:num_uniq], targets)
            hits = candidates.unsqueeze(0) == targets.unsqueeze(1)
            hits[torch.arange(len(targets)), labels] = False
            per_position = F.cross_entropy(logits.masked_fill(hits, -torch.inf), labels, reduction="none")
        loss = (per_position * task_scale[row_task]).sum() + 0.0 * hidden.sum()  # 0 rows: still a graph
        task_sums = torch.zeros(NUM_TASKS).index_add_(0, row_task, per_position.detach())
        return loss, task_sums


def _sparse_optimizer(name: str, device: torch.device):
    import torchrec.optim as trec_optim

    table = {"adagrad": torch.optim.Adagrad, "rowwise_adagrad": trec_optim.RowWiseAdagrad,
             "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    if name not in table:
        raise ConfigError(f"distributed.sparse_optimizer must be one of {sorted(table)}, got {name!r}")
    if device.type == "cpu" and name not in CPU_OPTIMIZERS:
        raise ConfigError(f"distributed.sparse_optimizer={name!r} needs a GPU (FBGEMM on CPU offers {CPU_OPTIMIZERS})")
    return table[name]


def table_rows(cfg: Config, ranker: UnifiedRanker) -> dict[str, tuple[int, int]]:
    """{table: (rows the model needs, rows to allocate)}; capacity below the need is an error."""
    out = {}
    for name, bag in ranker.item_tower.ebc.embedding_bags.items():
        need = bag.weight.shape[0]
        want = cfg.distributed.tables.get(name).rows if name in cfg.distributed.tables else None
        if want is not None and want < need:
            raise ConfigError(f"distributed.tables.{name}.rows={want} is below the {need} rows the data needs")
        out[name] = (need, want or need)
    return out


def _enlarge_tables(ranker: UnifiedRanker, rows: dict[str, tuple[int, int]]) -> None:
    """Replace the EBC by one on the meta device with the configured capacities: DMP then allocates
    only each rank's shards (the full tables never exist in one process)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    old = ranker.item_tower.ebc
    dim = ranker.item_tower.dim
    tables = [EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=rows[c.name][1],
                                 feature_names=list(c.feature_names), pooling=c.pooling,
                                 init_fn=partial(nn.init.normal_, std=dim ** -0.5))
              for c in old.embedding_bag_configs()]
    ranker.item_tower.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def constraints(cfg: Config, device: torch.device) -> dict:
    from torchrec.distributed.planner.types import ParameterConstraints

    dcfg = cfg.distributed
    unknown = sorted(set(dcfg.tables) - set(TABLES))
    if unknown:
        raise ConfigError(f"distributed.tables: unknown table(s) {unknown}; the tables are {list(TABLES)}")
    out = {}
    for table in TABLES:
        tcfg = dcfg.tables.get(table)
        types = list(tcfg.sharding_types) if tcfg is not None and tcfg.sharding_types else list(dcfg.sharding_types)
        bad = [t for t in types if t not in CPU_SHARDING + GPU_ONLY_SHARDING]
        if bad or not types:
            raise ConfigError(f"sharding types for table {table}: {types} (choose from {CPU_SHARDING + GPU_ONLY_SHARDING})")
        if device.type == "cpu" and any(t in GPU_ONLY_SHARDING for t in types):
            raise ConfigError(f"table {table}: {[t for t in types if t in GPU_ONLY_SHARDING]} sharding needs "
                              f"GPUs (NCCL); on CPU/gloo use {CPU_SHARDING}")
        out[table] = ParameterConstraints(sharding_types=types,
                                          min_partition=tcfg.min_partition if tcfg is not None else None)
    return out


def plan_summary(plan) -> dict[str, dict]:
    """{table: {sharding_type, ranks, shards: [[row0, col0, rows, cols, rank], ...]}}."""
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


def build_sharded(cfg: Config, prep: Prepared, device: torch.device):
    """(dmp, optimizer, dense_optimizer, plan) with the single-process initial weights."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    world = dist.get_world_size()
    torch.manual_seed(cfg.train.seed)
    ranker = build_ranker(cfg, prep)  # the exact initial weights of `unirank train`
    rows = table_rows(cfg, ranker)
    init = {f"ranker.{k}": v.detach().clone() for k, v in ranker.state_dict().items()}
    if any(need != want for need, want in rows.values()):
        _enlarge_tables(ranker, rows)
        for name, (need, want) in rows.items():  # enlarged tables keep their own (normal) init
            if need != want:
                init.pop(f"ranker.item_tower.ebc.embedding_bags.{name}.weight")
    module = RankerTrainModule(ranker)
    opt_cls = _sparse_optimizer(cfg.distributed.sparse_optimizer, device)
    opt_args = {"lr": cfg.distributed.sparse_lr}
    if opt_cls is torch.optim.Adagrad:
        opt_args["eps"] = 1e-8
    apply_optimizer_in_backward(opt_cls, module.ranker.item_tower.ebc.parameters(), opt_args)

    budget = cfg.distributed.memory_budget_gb
    cap = None if budget is None else int(budget * 1024 ** 3)
    topology = Topology(world_size=world, compute_device=device.type,
                        **({"ddr_cap": cap} if device.type == "cpu" else {"hbm_cap": cap}))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints(cfg, device))
    try:
        plan = planner.collective_plan(module, get_default_sharders(), dist.GroupMember.WORLD)
    except PlannerError as err:
        sizes = {t: f"{w} rows" for t, (_, w) in rows.items()}
        raise DistributedError(f"no sharding plan for {world} rank(s) (tables {sizes}, per-rank budget "
                               f"{budget} GB): {str(err).splitlines()[0]}") from err
    dmp = DistributedModelParallel(module, device=device, plan=plan)
    missing = dmp.load_state_dict(init, strict=False)
    unexpected = [k for k in missing.unexpected_keys]
    if unexpected:
        raise DistributedError(f"initial weights do not fit the sharded model: {unexpected}")
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.AdamW(params, lr=cfg.train.lr,
                                                                   weight_decay=cfg.train.weight_decay))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return dmp, optimizer, dense, plan


# ----------------------------------------------------------------------------------------------
# data


def shard_batch(batch: TrainBatch, rank: int, world: int, *, num_items: int, max_history: int, num_negatives: int,
                item_freq: torch.Tensor, generator: torch.Generator, weights: dict[Task, float]) -> dict:
    """This rank's rows of the global batch + what the loss needs from the whole batch (per-task
    target counts, shared candidates). Every rank runs this on the same batch with the same RNG."""
    req, n = batch.request, num_items
    width = 1 + min(req.history.shape[1], max_history)  # = model outputs after the TASK token
    keep = batch.targets[:, :width] > 0
    row_task = req.task.unsqueeze(1).expand_as(keep)[keep]
    counts = torch.bincount(row_task, minlength=NUM_TASKS)
    task_scale = torch.zeros(NUM_TASKS)
    for task, w in weights.items():
        if counts[task] > 0:
            task_scale[task] = world * w / counts[task].item()
    full = num_negatives == 0 or num_negatives >= n
    if full:
        candidates, logq, num_uniq = torch.arange(1, n + 1), None, 0
    else:
        uniq = torch.unique(batch.targets[batch.targets > 0])
        negatives = torch.randint(1, n + 1, (num_negatives,), generator=generator)
        candidates = torch.cat([uniq, negatives])
        q = (int(keep.sum()) * item_freq[candidates] + num_negatives / n).clamp(max=1.0)
        logq, num_uniq = torch.log(q), len(uniq)
    rows = torch.arange(rank, req.batch_size, world)
    return {"task": req.task[rows], "history": req.history[rows], "history_lengths": req.history_lengths[rows],
            "query": req.query[rows], "query_lengths": req.query_lengths[rows],
            "source_item": req.source_item[rows], "targets": batch.targets[rows], "candidates": candidates,
            "logq": logq, "task_scale": task_scale, "num_uniq": num_uniq, "full": full,
            "_counts": counts, "_rows": len(rows)}


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


def embedding_bytes(dmp, optimizer) -> dict[str, int]:
    """Bytes of embedding weights and fused optimizer state held by THIS rank."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def local(t) -> int:
        if isinstance(t, ShardedTensor):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
        if hasattr(t, "to_local"):
            t = t.to_local()
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    weights = sum(local(v) for k, v in dmp.state_dict().items() if ".ebc." in k)
    state = sum(local(v) for k, s in dmp.fused_optimizer.state_dict()["state"].items() for v in s.values())
    return {"weights": weights, "optimizer": state}


def memory_report(dmp, optimizer) -> dict:
    eb = embedding_bytes(dmp, optimizer)
    return {"rank": dist.get_rank(), "embedding_weights_mb": round(eb["weights"] / 2 ** 20, 1),
            "embedding_optimizer_mb": round(eb["optimizer"] / 2 ** 20, 1),
            "rss_mb": round(_proc_status_kb("VmRSS") / 1024, 1), "peak_rss_mb": round(_proc_status_kb("VmHWM") / 1024, 1)}


# ----------------------------------------------------------------------------------------------
# the run


def init_distributed(cfg: Config) -> torch.device:
    if "RANK" not in os.environ:  # plain `python -m`: a 1-process group
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"distributed.backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.distributed.timeout_s))
    want = cfg.distributed.expect_world_size
    if want is not None and want != dist.get_world_size():
        raise DistributedError(f"distributed.expect_world_size={want} but torchrun started "
                               f"{dist.get_world_size()} rank(s): launch --nproc_per_node/--nnodes to match")
    return device


def _check_resume_config(ckpt: Path, trainer: dict, ranker_cfg: dict) -> None:
    saved = trainer.get("ranker_config", {})
    diff = {k: (saved.get(k), v) for k, v in ranker_cfg.items() if k != "attention_impl" and saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{ckpt}: checkpoint was trained with another model config ({detail})")


def run(cfg: Config, eval_only: bool = False, quiet: bool = False) -> dict:
    if not eval_only and (cfg.train.mask_seen or cfg.train.ema_decay or cfg.train.future_window
                          or cfg.train.id_weight_decay is not None or not cfg.train.decay_norms_and_biases
                          or cfg.train.label_smoothing or cfg.train.distill_from):
        raise ConfigError("train.mask_seen, train.ema_decay, train.future_window, train.id_weight_decay, "
                          "train.label_smoothing, train.distill_from and train.decay_norms_and_biases=false are "
                          "single-process options (unirank train) in this version; the torchrun trainer does "
                          "not implement them")
    device = init_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        raise DistributedError("the ranker's request path is CPU-only in this version (model/ builds tensors on "
                               "the CPU); GPU/NCCL sharding is planned, see docs/DISTRIBUTED.md")
    prep = prepare(cfg)
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    weights = {task: cfg.train.task_weights[int(task)] for task in tasks}
    dmp, optimizer, dense, plan = build_sharded(cfg, prep, device)
    ranker: UnifiedRanker = dmp.module.ranker
    summary_plan = plan_summary(plan)
    log(f"[unirank.distributed] world_size={world} backend={dist.get_backend()} sparse_optimizer="
        f"{cfg.distributed.sparse_optimizer}\n{plan}")

    out = Path(cfg.train.out_dir)
    root = Path(cfg.distributed.checkpoint_dir or out / "checkpoints")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        stale = sc.remove_stale(root)
        if stale:
            log(f"removed uncommitted checkpoint(s): {[p.name for p in stale]}")
    dist.barrier()

    examples = TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, cfg.train.seed, tuple(tasks))
    if Task.SIMILAR in tasks and not (examples.lengths >= 2).any():
        raise ValueError("similar-item training needs users with >= 2 training items")
    item_freq = item_frequencies(prep.split.train, prep.data.num_items)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    st = {"epoch": 1, "batches_done": 0, "epoch_rng": None, "step": 0, "best": -1.0, "best_epoch": 0,
          "best_checkpoint": None, "bad_rounds": 0, "history": [], "losses": [], "task_losses": [],
          "samples": 0, "train_seconds": 0.0, "resumed_from": [], "validation": None}
    ckpt = sc.latest(root) if (cfg.distributed.resume or eval_only) else None
    if eval_only and ckpt is None:
        raise CheckpointError(f"--eval-only: no committed checkpoint in {root}")
    if ckpt is not None:
        trainer = sc.verify(ckpt)
        _check_resume_config(ckpt, trainer, ranker.config.to_dict())
        loaded = sc.load_sharded(ckpt, dmp, optimizer, dense)
        st.update({k: v for k, v in loaded["trainer"].items() if k in st})
        st["resumed_from"] = st["resumed_from"] + [{"checkpoint": ckpt.name, "from_world_size": trainer["world_size"],
                                                    "to_world_size": world}]
        generator.set_state(torch.tensor(trainer["generator"], dtype=torch.uint8))
        if loaded["rank_state"] is not None and trainer["world_size"] == world:
            torch.set_rng_state(loaded["rank_state"]["torch"])
        log(f"resumed from {ckpt} (saved by {trainer['world_size']} rank(s), step {trainer['step']})")

    if eval_only:
        metrics = validate(ranker, prep, tasks, cfg)
        result = {"checkpoint": str(ckpt), "step": st["step"], "score": selection_score(metrics),
                  **{f"{t}/{k}": m[k]["mean"] for t, m in metrics.items() for k in ("recall@10", "ndcg@10")}}
        log(json.dumps(result))
        dist.barrier()
        return result

    ranker_cfg = ranker.config.to_dict()

    def save(step_name_epoch_done: bool) -> Path:
        state = {**st, "generator": generator.get_state().tolist(), "ranker_config": ranker_cfg,
                 "plan": summary_plan}
        return sc.save_sharded(root, st["step"], dmp, optimizer, state, {"torch": torch.get_rng_state()},
                               to_yaml(cfg), keep=cfg.distributed.keep_checkpoints,
                               protect=(st["best_checkpoint"],) if st["best_checkpoint"] else ())

    memory = None
    stopped = False
    epoch = st["epoch"]
    while epoch <= cfg.train.max_epochs and not stopped:
        if st["epoch_rng"] is not None:
            examples.rng.bit_generator.state = st["epoch_rng"]
        st["epoch_rng"] = examples.rng.bit_generator.state
        skip = st["batches_done"]
        dmp.train()
        t_epoch = time.time()
        for i, batch in enumerate(examples.epoch()):
            if i < skip:  # replayed for the data-order RNG, trained before the checkpoint
                continue
            inputs = shard_batch(batch, rank, world, num_items=ranker.num_items, max_history=ranker.config.max_history,
                                 num_negatives=cfg.train.num_negatives, item_freq=item_freq, generator=generator,
                                 weights=weights)
            counts = inputs.pop("_counts")
            inputs.pop("_rows")
            optimizer.zero_grad(set_to_none=True)
            loss, task_sums = dmp(**inputs)
            loss.backward()
            optimizer.step()
            report = torch.cat([loss.detach().reshape(1) / world, task_sums])
            dist.all_reduce(report)
            st["step"] += 1
            st["batches_done"] = i + 1
            st["samples"] += batch.request.batch_size
            st["losses"].append(float(report[0]))
            st["task_losses"].append({TASK_NAMES[t]: float(report[1 + int(t)] / counts[t]) for t in tasks if counts[t] > 0})
            if memory is None:
                memory = memory_report(dmp, optimizer)
            if cfg.distributed.checkpoint_every and st["step"] % cfg.distributed.checkpoint_every == 0:
                st["train_seconds"] += time.time() - t_epoch
                t_epoch = time.time()
                save(False)
            if cfg.distributed.stop_after_steps is not None and st["step"] >= cfg.distributed.stop_after_steps:
                stopped = True
                break
        st["train_seconds"] += time.time() - t_epoch
        if stopped:
            if not (cfg.distributed.checkpoint_every and st["step"] % cfg.distributed.checkpoint_every == 0):
                save(False)
            log(f"stopped at step {st['step']} (distributed.stop_after_steps)")
            break
        st["epoch"], st["batches_done"], st["epoch_rng"] = epoch + 1, 0, examples.rng.bit_generator.state
        over = torch.tensor([float(cfg.train.max_minutes is not None and time.time() - t0 > 60 * cfg.train.max_minutes)])
        dist.all_reduce(over, op=dist.ReduceOp.MAX)
        over_budget = bool(over.item())
        if epoch % cfg.train.eval_every and not over_budget and epoch != cfg.train.max_epochs:
            save(False)
            epoch += 1
            continue
        metrics = validate(ranker, prep, tasks, cfg)  # every rank, same inputs: lookups stay collective
        dmp.train()
        score = selection_score(metrics)
        row = {"epoch": epoch, "step": st["step"], "seconds": round(time.time() - t0, 1), "score": score,
               **{f"{t}/{k}": m[k]["mean"] for t, m in metrics.items() for k in ("recall@10", "ndcg@10")}}
        st["history"].append(row)
        if not quiet:
            log(json.dumps(row))
        improved = score > st["best"]
        if improved:
            st.update(best=score, best_epoch=epoch, bad_rounds=0, best_checkpoint=sc.checkpoint_name(st["step"]),
                      validation=metrics)
        else:
            st["bad_rounds"] += 1
        save(False)
        if st["bad_rounds"] >= cfg.train.patience or over_budget:
            break
        epoch += 1

    memories = [None] * world
    dist.all_gather_object(memories, memory)
    result = {"world_size": world, "steps": st["step"], "best_epoch": st["best_epoch"], "best_score": st["best"],
              "history": st["history"], "losses": st["losses"], "task_losses": st["task_losses"],
              "samples_per_s": round(st["samples"] / max(st["train_seconds"], 1e-9), 1),
              "train_seconds": round(st["train_seconds"], 2), "memory": memories, "plan": summary_plan,
              "resumed_from": st["resumed_from"], "stopped": stopped, "seconds": round(time.time() - t0, 1)}
    if rank == 0:
        (out / "train_history.json").write_text(json.dumps(st["history"], indent=1))
        if not stopped and cfg.distributed.consolidate and st["best_checkpoint"]:
            result["checkpoint"] = str(sc.consolidate(root / st["best_checkpoint"], out / "best.pt", cfg, prep))
        (out / "distributed_result.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unirank.training.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file or packaged config name")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--eval-only", action="store_true", help="load the latest checkpoint, print validation metrics")
    parser.add_argument("--consolidate", metavar="CKPT_DIR", default=None,
                        help="no training: sharded checkpoint -> single-file checkpoint (--out), one process")
    parser.add_argument("--out", default=None, help="output file of --consolidate")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.consolidate:
            if not args.out:
                parser.error("--consolidate needs --out FILE")
            path = Path(args.consolidate)
            if (path / sc.LATEST).is_file():  # a checkpoint root: its latest checkpoint
                path = sc.latest(path)
            cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
            print(json.dumps({"checkpoint": str(sc.consolidate(path, args.out, cfg))}))
            return 0
        cfg = load_config(args.config, args.overrides)
        result = run(cfg, eval_only=args.eval_only, quiet=args.quiet)
        if not args.eval_only and (not dist.is_initialized() or dist.get_rank() == 0):
            print(json.dumps({k: result[k] for k in ("world_size", "steps", "best_epoch", "best_score",
                                                      "samples_per_s", "memory", "seconds")}))
        return 0
    except (ConfigError, CheckpointError, DistributedError, ValueError, FileNotFoundError) as err:
        rank = f" rank {dist.get_rank()}" if dist.is_initialized() else ""
        print(f"unirank.training.distributed{rank}: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
