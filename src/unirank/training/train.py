"""The one training loop of the unified ranker, at every world size and on every device.

`unirank train [--config FILE] [key=value ...]` is one process (world size 1); `unirank train
--nproc-per-node N ...` (torchrun's elastic launcher) runs N ranks of the same code, with the
embedding tables sharded by TorchRec (training/distributed.py, docs/DISTRIBUTED.md). Every step is
one mixed batch of all trained tasks (task-weighted loss, training/loss.py); every rank draws the same
global batch and trains on its rows (training/batches.py), so N ranks compute the 1-rank step.
The run's length, validation cadence and learning-rate curve are sized by the data in optimizer
updates (training/schedule.py). Validation-based early stopping, a resumable checkpoint every
epoch (an out_dir that holds one continues exactly where it stopped, also after a SIGKILL), the
best model as a single-file best.pt, TensorBoard scalars, progress bars."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from unirank.config import Config, load_config, task_weights, to_yaml
from unirank.data.examples import TrainingExamples
from unirank.data.prepare import Prepared, build_catalogue, prepare, ranker_config, trained_queries
from unirank.evaluation.evaluate import ModelScorer, evaluate_task
from unirank.model.ranker import UnifiedRanker
from unirank.model.request import TASK_BY_NAME, TASK_NAMES, Task
from unirank.training import distributed
from unirank.training import sharded_checkpoint as sc
from unirank.training.batches import StepInputs, step_inputs
from unirank.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unirank.training.loss import item_frequencies, step_loss
from unirank.training.run_state import RunState, optimizer_state, rng_state, set_rng_state, trainable
from unirank.training.schedule import lr_factor, sized_schedule

# keys a resumed run may change: where and how fast it runs, not what it computes
RESUMABLE_CHANGES = ("train.threads", "train.max_minutes", "train.device", "train.stop_after_steps",
                     "train.checkpoint_every", "train.keep_checkpoints", "distributed")


def validate(ranker: UnifiedRanker, prep: Prepared, tasks: list[Task], cfg: Config) -> dict[str, dict]:
    scorer = ModelScorer(ranker)
    return {TASK_NAMES[t]: evaluate_task(scorer, t, prep.split.valid, prep.builder, ks=cfg.eval.ks,
                                         max_users=cfg.train.eval_users, num_bootstrap=0, seed=cfg.train.seed)
            for t in tasks}


def selection_score(metrics: dict[str, dict]) -> float:
    """Model selection: mean validation NDCG@10 over the trained tasks."""
    return float(np.mean([m["ndcg@10"]["mean"] for m in metrics.values()]))


def parameter_groups(model: nn.Module, cfg: Config, ranker: UnifiedRanker | None = None) -> list[dict]:
    """AdamW groups of the trainable weights (training/run_state.trainable) by the roles the ranker
    names (UnifiedRanker.parameter_groups): a fine-tuned pretrained encoder takes a much smaller
    step than the freshly initialised rest; `train.id_weight_decay`, when set, gives the item-id
    table a decay of its own. `model`: a ranker, or the (DMP-wrapped) module that holds `ranker`."""
    params = list(trainable(model).values())
    owned = {id(p) for p in params}  # tables with a fused optimizer are FBGEMM's, not in any group
    roles = (ranker or model).parameter_groups()
    encoder = [p for p in roles["encoder"] if id(p) in owned]
    id_table = [p for p in roles["item_ids"] if id(p) in owned] if cfg.train.id_weight_decay is not None else []
    apart = {id(p) for p in encoder + id_table}
    return ([{"params": [p for p in params if id(p) not in apart]}]
            + ([{"params": encoder, "lr": cfg.train.encoder_lr}] if encoder else [])
            + ([{"params": id_table, "weight_decay": cfg.train.id_weight_decay}] if id_table else []))


def make_optimizer(model: nn.Module, cfg: Config, ranker: UnifiedRanker | None = None) -> torch.optim.Optimizer:
    """AdamW over every weight the trainer owns (`model`, `ranker`: as in parameter_groups)."""
    return torch.optim.AdamW(parameter_groups(model, cfg, ranker), lr=cfg.train.lr,
                             weight_decay=cfg.train.weight_decay)


class LossModule(nn.Module):
    """What the trainer runs (DMP wraps it under torchrun, so the whole loss runs inside DDP's
    forward): `forward(step inputs)` = this rank's share of the global loss and its per-task sums."""

    def __init__(self, ranker: UnifiedRanker, task_weights: dict[Task, float], **options):
        super().__init__()
        self.ranker, self.task_weights, self.options = ranker, task_weights, options

    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return step_loss(self.ranker, inputs, self.task_weights, **self.options)


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_validation: dict
    history: list[dict]
    seconds: float


def step_seed(seed: int, step: int) -> int:
    """The id-dropout draw of a step: the same on every rank and after a resume."""
    return (seed * 1_000_003 + step) % (1 << 62)


def _autocast(cfg: Config, device: torch.device):
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _check_resumable(out: Path, root: Path, cfg: Config) -> Path | None:
    """The committed checkpoint a run in `out` continues from, None for a new run; refuses an out_dir
    that holds a finished run, another run's checkpoints, or (train.resume=false) any run."""
    latest = sc.latest(root) if root.is_dir() else None
    if latest is None:
        if (out / "best.pt").is_file() and not cfg.train.init_from:
            raise CheckpointError(f"{out} already holds a trained run (best.pt, no resumable checkpoint): "
                                  "give train.out_dir a new directory")
        return None
    trainer = sc.verify(latest)
    if not cfg.train.resume:
        raise CheckpointError(f"{out} holds a run ({latest.name}); train.resume=false refuses to touch it: "
                              "give train.out_dir a new directory, or resume it")
    if trainer.get("finished"):
        raise CheckpointError(f"{out} holds a finished run (best epoch {trainer.get('best_epoch')}, "
                              f"{trainer.get('step')} steps): give train.out_dir a new directory")
    diff = _config_diff(load_config(str(latest / "config.yaml")), cfg)
    if diff:
        detail = ", ".join(f"{k}: run={run!r} now={now!r}" for k, (run, now) in list(diff.items())[:6])
        raise CheckpointError(f"{out} holds a run with another config ({detail}); resume it with the same config, "
                              "or give train.out_dir a new directory")
    return latest


def _config_diff(saved: Config, now: Config) -> dict[str, tuple]:
    """{setting: (saved value, now value)} where two configs differ, sorted, those a resume may
    change left out."""
    a, b = _flat(saved), _flat(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == c or k.startswith(c + ".") for c in RESUMABLE_CHANGES)}


def finished_run(cfg: Config) -> TrainResult | None:
    """The result of the finished run of `cfg` in its out_dir (best.pt, train_result.json and the
    same config), None when the out_dir holds no finished run; a finished run of another config is
    refused. Lets a benchmark whose test reads were interrupted go on without training again."""
    out = Path(cfg.train.out_dir)
    result_file, config_file = out / "train_result.json", out / "config.yaml"
    if not ((out / "best.pt").is_file() and result_file.is_file() and config_file.is_file()):
        return None
    diff = _config_diff(load_config(str(config_file)), cfg)
    if diff:
        raise CheckpointError(f"{out} holds a finished run with another config ({', '.join(list(diff)[:6])}): "
                              "give train.out_dir a new directory")
    try:
        result = json.loads(result_file.read_text())
        history, best_epoch = result["history"], result["best_epoch"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{result_file}: not a finished run's result ({err})") from err
    best_row = next((r for r in history if r["epoch"] == best_epoch), {})
    return TrainResult(out / "best.pt", best_epoch, best_row, history, float(result.get("seconds", 0.0)))


def _flat(cfg: Config) -> dict:
    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return dict(walk(OmegaConf.to_container(OmegaConf.structured(cfg))))


def train(cfg: Config, prep: Prepared | None = None, quiet: bool = False) -> TrainResult:
    runtime = distributed.start(cfg)
    try:
        return Trainer(cfg, runtime, prep, quiet).run()
    finally:
        runtime.stop()


class Trainer:
    """One run of `cfg` at this process's world size, from a fresh start, `train.init_from` or the
    resumable checkpoint in its out_dir.

    World size: every rank draws the same global batch and trains on its rows, with the same
    initial weights, data order, negatives and id-dropout draws, so N ranks compute the one-process
    step (same losses and validation: tests/distributed).
    Resume: the resumable checkpoint holds the weights, the optimizer state, the loop's position
    (epoch, batches done, the epoch's data-order RNG) and every RNG, so a killed run resumes to the
    same result as one never stopped."""

    def __init__(self, cfg: Config, runtime: distributed.Runtime, prep: Prepared | None, quiet: bool):
        self.t0 = time.time()
        self.cfg, self.runtime, self.quiet = cfg, runtime, quiet
        if cfg.model.content_distill and runtime.world > 1:
            raise ValueError("model.content_distill averages over each rank's own item targets, so several ranks "
                             "would not compute the one-process step: train it in one process")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.prep = prep = prep or prepare(cfg)
        self.tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
        self.out = Path(cfg.train.out_dir)
        self.root = Path(cfg.distributed.checkpoint_dir or self.out / "checkpoints")
        self.resume_from = _check_resumable(self.out, self.root, cfg)
        self.catalogue = build_catalogue(cfg, prep)
        ranker = UnifiedRanker(ranker_config(cfg, prep), self.catalogue)  # the same initial weights at every world size
        self.examples = TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, cfg.train.seed,
                                         tuple(self.tasks))
        if Task.SIMILAR in self.tasks and not (self.examples.lengths >= 2).any():
            raise ValueError("similar-item training needs users with >= 2 training items")
        device = runtime.device
        self.item_freq = item_frequencies(prep.split.train, prep.data.num_items).to(device)
        queries = trained_queries(cfg, prep)
        self.query_freq = None if queries is None else queries.frequencies().to(device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        module = self._loss_module(ranker)
        self.loaded = None
        if cfg.train.init_from:  # weights before sharding: the planner's shards start from them
            self.loaded = load_checkpoint(cfg.train.init_from, expect=ranker.config)
            ranker.load_state_dict(self.loaded.ranker.state_dict())
        self.plan = None
        if runtime.sharded:
            self.model, self.plan = distributed.shard(module, cfg, runtime)
            self.ranker = self.model.module.ranker
        else:
            self.model = module.to(device)
            self.ranker = module.ranker
        self._make_optimizers()
        self.steps_per_epoch = self.examples.steps_per_epoch()
        self.schedule = sized_schedule(cfg.train, self.steps_per_epoch)
        self.autocast = _autocast(cfg, device)
        self.st = RunState()
        self.writer, self.memory, self.stopped, self.clock = None, None, False, time.time()

    def _loss_module(self, ranker: UnifiedRanker) -> LossModule:
        cfg, prep, device = self.cfg, self.prep, self.runtime.device
        weights = {task: task_weights(cfg.train)[TASK_NAMES[task]] for task in self.tasks}
        excluded = None if prep.excluded_items is None else torch.as_tensor(prep.excluded_items, dtype=torch.int64,
                                                                            device=device)
        return LossModule(ranker, weights, excluded_items=excluded)

    def _make_optimizers(self) -> None:
        """The trainer's AdamW (with init_from's optimizer state) and, for tables updated inside
        FBGEMM's backward, their fused optimizer; the config's base rates the schedule multiplies."""
        self.fused = distributed.fused_optimizer(self.model)
        self.names = {id(p): n for n, p in trainable(self.model).items()}
        self.optimizer = make_optimizer(self.model, self.cfg, self.ranker)
        if self.loaded is not None and self.loaded.optimizer_state:
            try:
                self.optimizer.load_state_dict(self.loaded.optimizer_state)
            except ValueError as err:  # PyTorch's message names no option
                raise CheckpointError(
                    f"{self.cfg.train.init_from}: its optimizer state does not fit this run's parameter groups "
                    f"({err}); train.id_weight_decay and model.query_encoder must be set as in the run that "
                    "wrote it") from err
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # the config's, even after a resume
        self.fused_lrs = [group["lr"] for group in self.fused.param_groups] if self.fused is not None else []

    def run(self) -> TrainResult:
        self.restore()
        self.open_run_dir()
        while self.st.epoch <= self.schedule.epochs and not self.st.finished and not self.stopped:
            self.epoch()
        if not self.stopped and not self.st.finished:  # the last epoch reached without a validation round left to run
            self.st.finished = True
            self.save_last()
        return self.finish()

    def restore(self) -> None:
        """init_from: the schedule continues after the loaded run's best epoch. A resumable
        checkpoint: weights, optimizer state, loop position and RNGs as saved, so the run goes on
        as if never stopped (at any world size: DCP reshards the tables to this run's plan)."""
        if self.loaded is not None:
            st = self.st
            st.best_epoch = self.loaded.metadata.get("epoch", 0)
            st.best, st.epoch = selection_score(self.loaded.metadata["validation"]), st.best_epoch + 1
            st.step = st.best_epoch * self.steps_per_epoch
        if self.resume_from is not None:
            self.resume(self.resume_from)

    def resume(self, path: Path) -> None:
        state = self.checkpoint_state()
        restored = sc.load_sharded(path, state)  # into the live tensors of `state`
        if self.runtime.sharded:
            self.model.load_state_dict(state["model"])
        if self.fused is not None:
            self.fused.load_state_dict({**self.fused.state_dict(), "state": state["fused"]})
        saved = restored["trainer"]
        self.st = RunState.from_dict(saved)
        self.st.resumed_from = self.st.resumed_from + [{"checkpoint": path.name, "from_world_size": saved["world_size"],
                                                        "to_world_size": self.runtime.world}]
        self.generator.set_state(torch.tensor(saved["generator"], dtype=torch.uint8))
        if restored["rank_state"] is not None and saved["world_size"] == self.runtime.world:
            set_rng_state(restored["rank_state"], self.runtime.device)
        self.say(f"resumed from {path} (saved by {saved['world_size']} rank(s), step {self.st.step})")

    def open_run_dir(self) -> None:
        """Written only once a resume or init_from has loaded, so a refused start leaves its run as it was."""
        if self.runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
            stale = sc.remove_stale(self.root)
            sc.save_catalogue(self.root, self.catalogue)
            if stale:
                self.say(f"removed uncommitted checkpoint(s): {[p.name for p in stale]}")
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
            sched = self.schedule
            self.say(f"[unirank train] {sched.epochs} epochs x {sched.steps_per_epoch} steps = {sched.total_steps} "
                     f"updates, validation every {sched.eval_every} epoch(s), warm-up {sched.warmup_steps} steps")
            if self.plan is not None:
                self.say(f"[unirank train] world_size={self.runtime.world} backend={torch.distributed.get_backend()} "
                         f"table optimizer={self.cfg.distributed.sparse_optimizer}\n{json.dumps(self.plan)}")
        self.runtime.barrier()

    def epoch(self) -> None:
        """Trains the current epoch from its first untrained batch, then validates it (at the
        schedule's cadence, the last epoch, or once over the time budget) and checkpoints."""
        epoch = self.st.epoch
        self.train_epoch()
        if self.stopped:
            return
        self.st.epoch, self.st.batches_done, self.st.epoch_rng = epoch + 1, 0, self.examples.rng.bit_generator.state
        over_budget = self.over_budget()
        if self.schedule.validates(epoch) or over_budget:
            self.validate(epoch, over_budget)
        self.save_last()

    def train_epoch(self) -> None:
        st = self.st
        if st.epoch_rng is not None:  # a resumed epoch replays its data order
            self.examples.rng.bit_generator.state = st.epoch_rng
        st.epoch_rng = self.examples.rng.bit_generator.state
        skip, self.clock = st.batches_done, time.time()
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {st.epoch}", leave=False,
                   disable=self.quiet or not self.runtime.is_main)
        for i, batch in enumerate(self.examples.epoch()):
            if i < skip:  # replayed for the data-order RNG, trained before the checkpoint
                continue
            self.step(batch)
            st.batches_done = i + 1
            bar.update()
            bar.set_postfix(loss=f"{st.losses[-1]:.3f}")
            if self.checkpoint_due():
                self.count_train_time()
                self.save_last()
            if self.cfg.train.stop_after_steps is not None and st.step >= self.cfg.train.stop_after_steps:
                self.stopped = True
                break
        bar.close()
        self.count_train_time()
        if self.stopped:
            if not self.checkpoint_due():
                self.save_last()
            self.say(f"stopped at step {st.step} (train.stop_after_steps)")

    def step(self, batch) -> None:
        """One optimizer step on the global batch (this rank's rows of it); every rank reports the
        global loss."""
        st, device = self.st, self.runtime.device
        self.set_rates(lr_factor(st.step, self.schedule))
        inputs = step_inputs(self.ranker, batch.to(device), num_negatives=self.cfg.train.num_negatives,
                             item_freq=self.item_freq, generator=self.generator, rank=self.runtime.rank,
                             world=self.runtime.world, id_dropout_seed=step_seed(self.cfg.train.seed, st.step),
                             query_freq=self.query_freq)
        if self.runtime.sharded:  # the sharded collection's input all-to-all starts from this KJT
            inputs.items.features = inputs.items.features.to_kjt()
        with self.autocast:
            loss, task_sums = self.model(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.fused is not None:
            self.fused.step()  # applies the scheduled rate (the update itself ran in the backward)
        self.record(loss, task_sums, inputs.task_counts, batch.request.batch_size)

    def set_rates(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        if self.fused is not None:
            for group, base in zip(self.fused.param_groups, self.fused_lrs):
                group["lr"] = base * factor

    def record(self, loss: torch.Tensor, task_sums: torch.Tensor, counts, samples: int) -> None:
        st, world = self.st, self.runtime.world
        report = self.runtime.all_reduce(torch.cat([loss.detach().float().reshape(1) / world, task_sums.float()]).cpu())
        st.step += 1
        st.samples += samples
        st.losses.append(float(report[0]))
        st.task_losses.append({TASK_NAMES[t]: float(report[1 + int(t)] / counts[int(t)]) for t in self.tasks
                               if counts[int(t)] > 0})
        if self.writer is not None:
            for name, value in st.task_losses[-1].items():
                self.writer.add_scalar(f"loss/{name}", value, st.step)
        if self.memory is None:
            self.memory = distributed.memory_report(self.model, optimizer_state(self.optimizer, self.names),
                                                    self.runtime.rank)

    def checkpoint_due(self) -> bool:
        every = self.cfg.train.checkpoint_every
        return bool(every) and self.st.step % every == 0

    def count_train_time(self) -> None:
        now = time.time()
        self.st.train_seconds += now - self.clock
        self.clock = now

    def over_budget(self) -> bool:
        """train.max_minutes spent on any rank (every rank then stops at the same epoch)."""
        limit = self.cfg.train.max_minutes
        over = torch.tensor([float(limit is not None and time.time() - self.t0 > 60 * limit)])
        if self.runtime.sharded:
            over = self.runtime.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        return bool(over.item())

    def validate(self, epoch: int, over_budget: bool) -> None:
        """A validation round: every rank scores the same users (sharded lookups stay collective);
        the best score so far is saved, train.patience rounds without one stop the run."""
        st = self.st
        metrics = validate(self.ranker, self.prep, self.tasks, self.cfg)
        score = selection_score(metrics)
        improved = score > st.best
        if improved:
            self.save_best(epoch, metrics)
        row = {"epoch": epoch, "step": st.step, "seconds": round(time.time() - self.t0, 1), "score": score,
               **{f"{t}/{k}": m[k]["mean"] for t, m in metrics.items() for k in ("recall@10", "ndcg@10")}}
        st.history.append(row)
        self.log_round(row)
        if improved:
            st.best, st.best_epoch, st.bad_rounds, st.validation = score, epoch, 0, metrics
        else:
            st.bad_rounds += 1
        st.finished = st.bad_rounds >= self.cfg.train.patience or over_budget or epoch == self.schedule.epochs

    def log_round(self, row: dict) -> None:
        if self.writer is None:
            return
        (self.out / "train_history.json").write_text(json.dumps(self.st.history, indent=1))  # kept if the run is stopped
        for key, value in row.items():
            if "/" in key:
                self.writer.add_scalar(f"valid/{key}", value, self.st.step)
        self.say(json.dumps(row))

    def checkpoint_state(self) -> dict:
        """The tensors of the resumable checkpoint (DCP saves them, and loads into them)."""
        state = {"model": self.model.state_dict(), "optim": optimizer_state(self.optimizer, self.names)}
        if self.fused is not None:
            state["fused"] = self.fused.state_dict()["state"]
        return state

    def save_last(self) -> None:
        """The resumable checkpoint of this step (collective), with the loop state beside the tensors."""
        st = self.st
        trainer = {**st.to_dict(), "generator": self.generator.get_state().tolist(), "plan": self.plan,
                   "ranker_config": self.ranker.config.to_dict()}
        sc.save_sharded(self.root, st.step, self.checkpoint_state(), trainer, rng_state(self.runtime.device),
                        to_yaml(self.cfg), keep=self.cfg.train.keep_checkpoints,
                        protect=(st.best_checkpoint,) if st.best_checkpoint else ())

    def save_best(self, epoch: int, metrics: dict) -> None:
        """best.pt at once where every table is whole on each rank; sharded tables: at the end,
        consolidated from that step's committed checkpoint (kept until then)."""
        state = self.model.state_dict()
        if not all(isinstance(v, torch.Tensor) and type(v) is torch.Tensor for v in state.values()):
            self.st.best_checkpoint = sc.checkpoint_name(self.st.step)
            return
        if self.runtime.is_main:
            full = {k[len("ranker."):]: v for k, v in state.items() if k.startswith("ranker.")}
            save_checkpoint(self.out / "best.pt", self.ranker, self.catalogue, to_yaml(self.cfg),
                            {**self.metadata(), "epoch": epoch, "validation": metrics,
                             "trained_world_size": self.runtime.world},
                            self.optimizer if self.fused is None else None, state_dict=full)
        self.st.best_checkpoint = None

    def metadata(self) -> dict:
        data = self.prep.data
        return {"dataset": data.name, "fingerprint": data.fingerprint(), "tasks": self.cfg.train.tasks}

    def finish(self) -> TrainResult:
        """train_result.json (every rank's memory, the losses, the history) and, for sharded tables,
        best.pt consolidated from the best epoch's checkpoint."""
        st, runtime = self.st, self.runtime
        memories = [self.memory]
        if runtime.sharded:
            memories = [None] * runtime.world
            torch.distributed.all_gather_object(memories, self.memory)
        result = {"world_size": runtime.world, "device": str(runtime.device), "steps": st.step,
                  "schedule": self.schedule.to_dict(),
                  "best_epoch": st.best_epoch, "best_score": st.best, "history": st.history, "losses": st.losses,
                  "task_losses": st.task_losses, "samples_per_s": round(st.samples / max(st.train_seconds, 1e-9), 1),
                  "train_seconds": round(st.train_seconds, 2), "memory": memories, "plan": self.plan,
                  "resumed_from": st.resumed_from, "stopped": self.stopped, "seconds": round(time.time() - self.t0, 1)}
        if runtime.is_main:
            (self.out / "train_history.json").write_text(json.dumps(st.history, indent=1))
            if not self.stopped and st.best_checkpoint and self.cfg.distributed.consolidate:
                sc.consolidate(self.root / st.best_checkpoint, self.out / "best.pt")
            (self.out / "train_result.json").write_text(json.dumps(result, indent=1))
            self.writer.close()
        runtime.barrier()
        best_row = next((r for r in st.history if r["epoch"] == st.best_epoch), {})
        return TrainResult(self.out / "best.pt", st.best_epoch, best_row, st.history, time.time() - self.t0)

    def say(self, message: str) -> None:
        if self.runtime.is_main and not self.quiet:
            print(message, flush=True)
