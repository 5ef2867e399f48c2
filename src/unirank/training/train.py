"""The one training loop of the unified ranker, at every world size and on every device.

`unirank train [--config FILE] [key=value ...]` is one process (world size 1); `unirank train
--nproc-per-node N ...` (torchrun's elastic launcher) runs N ranks of the same code, with the
embedding tables sharded by TorchRec (training/distributed.py, docs/DISTRIBUTED.md). Every step is
one mixed batch of all trained tasks (task-weighted loss, training/loss.py); every rank draws the same
global batch and trains on its rows (training/batches.py), so N ranks compute the 1-rank step.
Validation-based early stopping, a resumable checkpoint every epoch (an out_dir that holds one
continues exactly where it stopped, also after a SIGKILL), the best model as a single-file
best.pt, TensorBoard scalars, progress bars."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from unirank.model.lexical import table_width
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import TASK_NAMES, QueryTask, Task
from unirank.model.tokenizer import Tokenizer
from unirank.training import distributed
from unirank.training import sharded_checkpoint as sc
from unirank.training.batches import StepInputs, step_inputs
from unirank.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unirank.training.config import Config, ConfigError, load_config, task_weights, to_yaml
from unirank.data.datasets import InteractionData, load_dataset
from unirank.training.distill import load_teachers
from unirank.evaluation.evaluate import ModelScorer, evaluate_task
from unirank.data.examples import (RequestBuilder, Split, TrainingExamples, fit_tokenizer, item_lexical_rows,
                                       item_word_ids, leave_one_out_split)
from unirank.data.lm_features import ItemLMFeatures, item_lm_features
from unirank.data.query_catalogue import QueryCatalogue, build_query_catalogue
from unirank.training.loss import item_frequencies, step_loss
from unirank.training.run_state import RunState, optimizer_state, rng_state, set_rng_state, trainable

TASK_BY_NAME = {name: task for task, name in TASK_NAMES.items()}
ID_TABLE_WEIGHT = "item_tower.ebc.embedding_bags.item_id.weight"
# keys a resumed run may change: where and how fast it runs, not what it computes
RESUMABLE_CHANGES = ("train.threads", "train.max_minutes", "train.device", "train.stop_after_steps",
                     "train.checkpoint_every", "train.keep_checkpoints", "distributed")


@dataclass
class Prepared:
    """Everything derived from the data that training, evaluation and export share."""

    data: InteractionData
    split: Split
    tokenizer: Tokenizer
    item_words: list[list[int]]
    builder: RequestBuilder
    lm: ItemLMFeatures | None = None  # text vectors + semantic IDs, when the model config uses them
    excluded_items: np.ndarray | None = None  # item ids training never ranks (cold-start: not yet in the catalogue)
    queries: QueryCatalogue | None = None  # the suggest task's candidates (train.tasks with suggest)
    lexical_rows: list[list[int]] | None = None  # per id, the lexical field's token ids (model.lexical)


def trained_queries(cfg: Config, prep: Prepared) -> QueryCatalogue | None:
    """The query catalogue of a model trained with `cfg`: only a run that trains suggest carries one
    (the item-task twins of a suggest benchmark share its data, not its catalogue)."""
    return prep.queries if TASK_NAMES[QueryTask.SUGGEST] in cfg.train.tasks else None


def trained_query_texts(cfg: Config, prep: Prepared) -> list[str]:
    queries = trained_queries(cfg, prep)
    return [] if queries is None else queries.texts


def prepare(cfg: Config, data: InteractionData | None = None, fit_items: np.ndarray | None = None) -> Prepared:
    """`data` replaces the configured dataset (e.g. a cold-start copy); `fit_items` restricts the
    semantic-ID codebook fit (see item_lm_features)."""
    data = data or load_dataset(cfg.data.path, cfg.data.format, **asdict(cfg.data.synthetic))
    split = leave_one_out_split(data.sequences)
    if len(split.users) == 0:
        raise ValueError(f"{cfg.data.path}: no user has the 3 interactions leave-one-out needs")
    tokenizer = fit_tokenizer(data, cfg.model.tokenizer)
    queries = None
    if TASK_NAMES[QueryTask.SUGGEST] in cfg.train.tasks:
        queries = build_query_catalogue(data, split, cfg.data.zero_shot_modulus)
        if not len(queries):
            raise ValueError(f"{cfg.data.path}: the training split builds no search query: suggest has no candidates")
    builder = RequestBuilder(data, tokenizer, cfg.model.max_history, cfg.model.max_query_len,
                             cfg.data.zero_shot_modulus, queries)
    lm = None
    if cfg.model.text_features or cfg.model.semantic_id_levels:
        lm = item_lm_features(data, cfg.data.cache_dir, cfg.model.semantic_id_levels, cfg.train.seed, fit_items)
    lexical = item_lexical_rows(data, tokenizer, cfg.model.lexical) if cfg.model.lexical != "none" else None
    return Prepared(data, split, tokenizer, item_word_ids(data, tokenizer), builder, lm, queries=queries,
                    lexical_rows=lexical)


def ranker_config(cfg: Config, prep: Prepared) -> RankerConfig:
    lm = prep.lm
    return RankerConfig(num_items=prep.data.num_items, num_attributes=prep.data.num_attributes,
                        num_words=prep.tokenizer.vocab_size, **asdict(cfg.model),
                        text_dim=int(lm.text.shape[1]) if lm is not None and cfg.model.text_features else 0,
                        semantic_id_sizes=lm.level_sizes if lm is not None else [],
                        num_queries=len(trained_query_texts(cfg, prep)),
                        lexical_width=table_width(prep.lexical_rows) if prep.lexical_rows is not None else 0)


def build_ranker(cfg: Config, prep: Prepared) -> UnifiedRanker:
    lm = prep.lm
    queries = trained_queries(cfg, prep)
    return UnifiedRanker(ranker_config(cfg, prep), prep.data.item_attributes, prep.item_words,
                         item_codes=lm.codes if lm is not None and lm.level_sizes else None,
                         item_text=lm.text if lm is not None and cfg.model.text_features else None,
                         query_tokens=None if queries is None else queries.token_ids(prep.tokenizer,
                                                                                    cfg.model.max_query_len),
                         lexical_rows=prep.lexical_rows)


def validate(ranker: UnifiedRanker, prep: Prepared, tasks: list[Task], cfg: Config) -> dict[str, dict]:
    scorer = ModelScorer(ranker)
    return {TASK_NAMES[t]: evaluate_task(scorer, t, prep.split.valid, prep.builder, ks=cfg.eval.ks,
                                         max_users=cfg.train.eval_users, num_bootstrap=0, seed=cfg.train.seed)
            for t in tasks}


def selection_score(metrics: dict[str, dict]) -> float:
    """Model selection: mean validation NDCG@10 over the trained tasks."""
    return float(np.mean([m["ndcg@10"]["mean"] for m in metrics.values()]))


def parameter_groups(params: dict[str, nn.Parameter], cfg: Config) -> list[dict]:
    """AdamW groups of the named trainable weights (training/run_state.trainable): a fine-tuned
    pretrained encoder takes a much smaller step than the freshly initialised rest;
    `train.id_weight_decay`, when set, gives the item-id table a decay of its own;
    `train.decay_norms_and_biases=false` takes the 1-D weights (LayerNorm gains, biases) out of the
    decay, so it cannot shrink the scale of the normalised context and item vectors (the logits)."""
    encoder = [p for n, p in params.items() if n.startswith("query_encoder.")]
    id_table = [p for n, p in params.items() if n == ID_TABLE_WEIGHT and cfg.train.id_weight_decay is not None]
    ids = {id(p) for p in encoder + id_table}
    rest = [p for p in params.values() if id(p) not in ids]
    no_decay = [] if cfg.train.decay_norms_and_biases else [p for p in rest if p.dim() <= 1]
    rest = [p for p in rest if p.dim() > 1 or cfg.train.decay_norms_and_biases]
    return ([{"params": rest}] + ([{"params": encoder, "lr": cfg.train.encoder_lr}] if encoder else [])
            + ([{"params": id_table, "weight_decay": cfg.train.id_weight_decay}] if id_table else [])
            + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else []))


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over every weight the trainer owns (`model`: a ranker, or the module that holds it as `.ranker`)."""
    return torch.optim.AdamW(parameter_groups(trainable(model), cfg), lr=cfg.train.lr,
                             weight_decay=cfg.train.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: Config) -> float:
    """Multiplier of train.lr at optimizer step `step` (0-based): linear warm-up, then constant or
    cosine down to train.lr_min_ratio at `total_steps` (the max_epochs horizon)."""
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    # a Python float: the optimizer state (checkpoints load weights-only) must hold no numpy scalars
    return float(t.lr_min_ratio + (1.0 - t.lr_min_ratio) * 0.5 * (1.0 + np.cos(np.pi * progress)))


class WeightAverage:
    """Exponential moving average of the trainable weights (train.ema_decay), with the usual short
    warm-up of the decay. `swapped()` puts the average into the model, for validation and the
    checkpoint, and then restores the live weights the optimizer keeps training."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.names, self.params = list(params), list(params.values())
        self.average = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

    def state(self) -> dict:
        """For the resumable checkpoint: the live average tensors (loaded into in place) by name."""
        return {"updates": torch.tensor(self.updates), **dict(zip(self.names, self.average))}

    @contextmanager
    def swapped(self):
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], live)


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
    saved = _flat(load_config(str(latest / "config.yaml")))
    now = _flat(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
                  and not any(k == c or k.startswith(c + ".") for c in RESUMABLE_CHANGES))
    if diff:
        detail = ", ".join(f"{k}: run={saved.get(k)!r} now={now.get(k)!r}" for k in diff[:6])
        raise CheckpointError(f"{out} holds a run with another config ({detail}); resume it with the same config, "
                              "or give train.out_dir a new directory")
    return latest


def _flat(cfg: Config) -> dict:
    from omegaconf import OmegaConf

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
        return _train(cfg, runtime, prep, quiet)
    finally:
        runtime.stop()


def _train(cfg: Config, runtime: distributed.Runtime, prep: Prepared | None, quiet: bool) -> TrainResult:
    t0 = time.time()
    device, rank, world = runtime.device, runtime.rank, runtime.world
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    prep = prep or prepare(cfg)
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    weights = {task: task_weights(cfg.train)[TASK_NAMES[task]] for task in tasks}
    out = Path(cfg.train.out_dir)
    root = Path(cfg.distributed.checkpoint_dir or out / "checkpoints")
    resume_from = _check_resumable(out, root, cfg)
    ranker = build_ranker(cfg, prep)  # the same initial weights at every world size
    examples = TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, cfg.train.seed, tuple(tasks))
    if Task.SIMILAR in tasks and not (examples.lengths >= 2).any():
        raise ValueError("similar-item training needs users with >= 2 training items")
    item_freq = item_frequencies(prep.split.train, prep.data.num_items).to(device)
    queries = trained_queries(cfg, prep)
    query_freq = None if queries is None else queries.frequencies().to(device)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    excluded = None if prep.excluded_items is None else torch.as_tensor(prep.excluded_items, dtype=torch.int64,
                                                                        device=device)
    teachers = None
    if cfg.train.distill_from:
        teachers = load_teachers(cfg.train.distill_from, cfg.train.distill_weight, cfg.train.distill_temperature,
                                 fingerprint=prep.data.fingerprint(), num_items=prep.data.num_items,
                                 tokenizer_state=prep.tokenizer.to_dict(), max_history=cfg.model.max_history)
        teachers.to(device)
    module = LossModule(ranker, weights, excluded_items=excluded, mask_seen=cfg.train.mask_seen,
                        future_window=cfg.train.future_window, future_weight=cfg.train.future_weight,
                        label_smoothing=cfg.train.label_smoothing, teachers=teachers)
    loaded = None
    if cfg.train.init_from:  # weights before sharding: the planner's shards start from them
        loaded = load_checkpoint(cfg.train.init_from, expect=ranker.config)
        ranker.load_state_dict(loaded.ranker.state_dict())
    plan = None
    if runtime.sharded:
        model, plan = distributed.shard(module, cfg, runtime)
        core: LossModule = model.module
    else:
        model = core = module.to(device)
    ranker = core.ranker
    fused = distributed.fused_optimizer(model)
    params = trainable(model)
    names = {id(p): n for n, p in params.items()}
    optimizer = make_optimizer(model, cfg)
    if loaded is not None and loaded.optimizer_state:
        try:
            optimizer.load_state_dict(loaded.optimizer_state)
        except ValueError as err:  # PyTorch's message names no option
            raise CheckpointError(
                f"{cfg.train.init_from}: its optimizer state does not fit this run's parameter groups "
                f"({err}); train.id_weight_decay, train.decay_norms_and_biases and model.query_encoder "
                "must be set as in the run that wrote it") from err
    if cfg.train.ema_decay and fused is not None:
        raise ConfigError("train.ema_decay averages the weights the trainer's AdamW owns; tables with a fused "
                          f"optimizer (distributed.sparse_optimizer={cfg.distributed.sparse_optimizer}) are updated "
                          "inside FBGEMM's backward: use sparse_optimizer=adamw")
    average = WeightAverage(params, cfg.train.ema_decay) if cfg.train.ema_decay else None
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # the config's, even after a resume
    fused_lrs = [group["lr"] for group in fused.param_groups] if fused is not None else []
    steps_per_epoch = examples.steps_per_epoch()
    total_steps = cfg.train.max_epochs * steps_per_epoch
    autocast = _autocast(cfg, device)

    def checkpoint_state() -> dict:
        state = {"model": model.state_dict(), "optim": optimizer_state(optimizer, names)}
        if fused is not None:
            state["fused"] = fused.state_dict()["state"]
        if average is not None:
            state["average"] = average.state()
        return state

    st = RunState()
    if loaded is not None:
        st.best_epoch = loaded.metadata.get("epoch", 0)
        st.best, st.epoch = selection_score(loaded.metadata["validation"]), st.best_epoch + 1
        st.step = st.best_epoch * steps_per_epoch  # the schedule continues where it was
    if resume_from is not None:
        state = checkpoint_state()
        restored = sc.load_sharded(resume_from, state)
        if runtime.sharded:
            model.load_state_dict(state["model"])
        if fused is not None:
            fused.load_state_dict({**fused.state_dict(), "state": state["fused"]})
        if average is not None:
            average.updates = int(state["average"]["updates"])
        trainer = restored["trainer"]
        st = RunState.from_dict(trainer)
        st.resumed_from = st.resumed_from + [{"checkpoint": resume_from.name, "from_world_size": trainer["world_size"],
                                              "to_world_size": world}]
        generator.set_state(torch.tensor(trainer["generator"], dtype=torch.uint8))
        if restored["rank_state"] is not None and trainer["world_size"] == world:
            set_rng_state(restored["rank_state"], device)
        if runtime.is_main and not quiet:
            print(f"resumed from {resume_from} (saved by {trainer['world_size']} rank(s), step {st.step})", flush=True)
    metadata = {"dataset": prep.data.name, "fingerprint": prep.data.fingerprint(), "tasks": cfg.train.tasks}

    # Written only once a resume or init_from has loaded, so a refused start leaves its run as it was.
    writer = None
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        stale = sc.remove_stale(root)
        if stale and not quiet:
            print(f"removed uncommitted checkpoint(s): {[p.name for p in stale]}", flush=True)
        writer = SummaryWriter(str(out / "tensorboard"))
        if plan is not None and not quiet:
            print(f"[unirank train] world_size={world} backend={torch.distributed.get_backend()} "
                  f"table optimizer={cfg.distributed.sparse_optimizer}\n{json.dumps(plan)}", flush=True)
    runtime.barrier()

    def save_last() -> None:
        trainer = {**st.to_dict(), "generator": generator.get_state().tolist(), "plan": plan}
        sc.save_sharded(root, st.step, checkpoint_state(), trainer, rng_state(device), to_yaml(cfg),
                        keep=cfg.train.keep_checkpoints, protect=(st.best_checkpoint,) if st.best_checkpoint else ())

    def save_best(epoch: int, metrics: dict) -> None:
        """best.pt at once where every table is whole on each rank; sharded tables: at the end,
        consolidated from that step's committed checkpoint (kept until then)."""
        state = model.state_dict()
        if all(isinstance(v, torch.Tensor) and type(v) is torch.Tensor for v in state.values()):
            if runtime.is_main:
                full = {k[len("ranker."):]: v for k, v in state.items() if k.startswith("ranker.")}
                save_checkpoint(out / "best.pt", ranker, prep.tokenizer, prep.data.item_attributes, prep.item_words,
                                to_yaml(cfg), {**metadata, "epoch": epoch, "validation": metrics,
                                               "trained_world_size": world},
                                optimizer if fused is None else None, state_dict=full,
                                query_texts=trained_query_texts(cfg, prep))
            st.best_checkpoint = None
        else:
            st.best_checkpoint = sc.checkpoint_name(st.step)

    memory, stopped = None, False
    while st.epoch <= cfg.train.max_epochs and not st.finished and not stopped:
        epoch = st.epoch
        if st.epoch_rng is not None:
            examples.rng.bit_generator.state = st.epoch_rng
        st.epoch_rng = examples.rng.bit_generator.state
        skip, t_epoch = st.batches_done, time.time()
        model.train()
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch}", disable=quiet or not runtime.is_main,
                   leave=False)
        for i, batch in enumerate(examples.epoch()):
            if i < skip:  # replayed for the data-order RNG, trained before the checkpoint
                continue
            factor = lr_factor(st.step, total_steps, cfg)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            if fused is not None:
                for group, base in zip(fused.param_groups, fused_lrs):
                    group["lr"] = base * factor
            inputs = step_inputs(ranker, batch.to(device), num_negatives=cfg.train.num_negatives, item_freq=item_freq,
                                 generator=generator, rank=rank, world=world,
                                 id_dropout_seed=step_seed(cfg.train.seed, st.step), query_freq=query_freq)
            if runtime.sharded:  # the sharded collection's input all-to-all starts from this KJT
                inputs.items.features = inputs.items.features.to_kjt()
            with autocast:
                loss, task_sums = model(inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if fused is not None:
                fused.step()  # applies the scheduled rate (the update itself ran in the backward)
            if average is not None:
                average.update()
            report = runtime.all_reduce(torch.cat([loss.detach().float().reshape(1) / world, task_sums.float()]).cpu())
            counts = inputs.task_counts
            st.step, st.batches_done = st.step + 1, i + 1
            st.samples += batch.request.batch_size
            st.losses.append(float(report[0]))
            st.task_losses.append({TASK_NAMES[t]: float(report[1 + int(t)] / counts[int(t)]) for t in tasks
                                   if counts[int(t)] > 0})
            if writer is not None:
                for name, value in st.task_losses[-1].items():
                    writer.add_scalar(f"loss/{name}", value, st.step)
            bar.update()
            bar.set_postfix(loss=f"{st.losses[-1]:.3f}")
            if memory is None:
                memory = distributed.memory_report(model, optimizer_state(optimizer, names), rank)
            if cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0:
                st.train_seconds += time.time() - t_epoch
                t_epoch = time.time()
                save_last()
            if cfg.train.stop_after_steps is not None and st.step >= cfg.train.stop_after_steps:
                stopped = True
                break
        bar.close()
        st.train_seconds += time.time() - t_epoch
        if stopped:
            if not (cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0):
                save_last()
            if runtime.is_main and not quiet:
                print(f"stopped at step {st.step} (train.stop_after_steps)", flush=True)
            break
        st.epoch, st.batches_done, st.epoch_rng = epoch + 1, 0, examples.rng.bit_generator.state
        over = torch.tensor([float(cfg.train.max_minutes is not None and time.time() - t0 > 60 * cfg.train.max_minutes)])
        over_budget = bool(runtime.all_reduce(over, op=torch.distributed.ReduceOp.MAX).item()) if runtime.sharded \
            else bool(over.item())
        if epoch % cfg.train.eval_every and not over_budget and epoch != cfg.train.max_epochs:
            save_last()
            continue
        with average.swapped() if average is not None else nullcontext():  # the average is validated and saved
            metrics = validate(ranker, prep, tasks, cfg)  # every rank, same inputs: sharded lookups stay collective
            score = selection_score(metrics)
            improved = score > st.best
            if improved:
                save_best(epoch, metrics)
        row = {"epoch": epoch, "step": st.step, "seconds": round(time.time() - t0, 1), "score": score,
               **{f"{t}/{k}": m[k]["mean"] for t, m in metrics.items() for k in ("recall@10", "ndcg@10")}}
        st.history.append(row)
        if writer is not None:
            (out / "train_history.json").write_text(json.dumps(st.history, indent=1))  # kept if the run is stopped
            for key, value in row.items():
                if "/" in key:
                    writer.add_scalar(f"valid/{key}", value, st.step)
            if not quiet:
                print(json.dumps(row), flush=True)
        if improved:
            st.best, st.best_epoch, st.bad_rounds, st.validation = score, epoch, 0, metrics
        else:
            st.bad_rounds += 1
        st.finished = st.bad_rounds >= cfg.train.patience or over_budget or epoch == cfg.train.max_epochs
        save_last()
    if not stopped and not st.finished:  # max_epochs reached without a validation round left to run
        st.finished = True
        save_last()

    memories = [None] * world
    if runtime.sharded:
        torch.distributed.all_gather_object(memories, memory)
    else:
        memories = [memory]
    result = {"world_size": world, "device": str(device), "steps": st.step, "best_epoch": st.best_epoch,
              "best_score": st.best, "history": st.history, "losses": st.losses, "task_losses": st.task_losses,
              "samples_per_s": round(st.samples / max(st.train_seconds, 1e-9), 1),
              "train_seconds": round(st.train_seconds, 2), "memory": memories, "plan": plan,
              "resumed_from": st.resumed_from, "stopped": stopped, "seconds": round(time.time() - t0, 1)}
    if runtime.is_main:
        (out / "train_history.json").write_text(json.dumps(st.history, indent=1))
        if not stopped and st.best_checkpoint and cfg.distributed.consolidate:
            sc.consolidate(root / st.best_checkpoint, out / "best.pt", cfg, prep)
        (out / "train_result.json").write_text(json.dumps(result, indent=1))
        writer.close()
    runtime.barrier()
    best_row = next((r for r in st.history if r["epoch"] == st.best_epoch), {})
    return TrainResult(out / "best.pt", st.best_epoch, best_row, st.history, time.time() - t0)
