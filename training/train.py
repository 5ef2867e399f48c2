"""Single-process training of the unified ranker: all configured tasks mixed in every step
(one batch per task, task-weighted sum of losses), validation-based early stopping, atomic
checkpoints, TensorBoard scalars. Run: `unirank train [--config FILE] [key=value ...]`."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import TASK_NAMES, Task
from unirank.model.tokenizer import Tokenizer
from unirank.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unirank.training.config import Config, to_yaml
from unirank.training.datasets import InteractionData, load_dataset
from unirank.training.distill import load_teachers
from unirank.training.evaluate import ModelScorer, evaluate_task
from unirank.training.examples import (RequestBuilder, Split, TrainingExamples, fit_tokenizer,
                                       item_word_ids, leave_one_out_split)
from unirank.training.lm_features import ItemLMFeatures, item_lm_features
from unirank.training.loss import item_frequencies, softmax_loss

TASK_BY_NAME = {name: task for task, name in TASK_NAMES.items()}


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


def prepare(cfg: Config, data: InteractionData | None = None, fit_items: np.ndarray | None = None) -> Prepared:
    """`data` replaces the configured dataset (e.g. a cold-start copy); `fit_items` restricts the
    semantic-ID codebook fit (see item_lm_features)."""
    data = data or load_dataset(cfg.data.path, cfg.data.format, **asdict(cfg.data.synthetic))
    split = leave_one_out_split(data.sequences)
    if len(split.users) == 0:
        raise ValueError(f"{cfg.data.path}: no user has the 3 interactions leave-one-out needs")
    tokenizer = fit_tokenizer(data, cfg.model.tokenizer)
    builder = RequestBuilder(data, tokenizer, cfg.model.max_history, cfg.model.max_query_len)
    lm = None
    if cfg.model.text_features or cfg.model.semantic_id_levels:
        lm = item_lm_features(data, cfg.data.cache_dir, cfg.model.semantic_id_levels, cfg.train.seed, fit_items)
    return Prepared(data, split, tokenizer, item_word_ids(data, tokenizer), builder, lm)


def ranker_config(cfg: Config, prep: Prepared) -> RankerConfig:
    lm = prep.lm
    return RankerConfig(num_items=prep.data.num_items, num_attributes=prep.data.num_attributes,
                        num_words=prep.tokenizer.vocab_size, **asdict(cfg.model),
                        text_dim=int(lm.text.shape[1]) if lm is not None and cfg.model.text_features else 0,
                        semantic_id_sizes=lm.level_sizes if lm is not None else [])


def build_ranker(cfg: Config, prep: Prepared) -> UnifiedRanker:
    lm = prep.lm
    return UnifiedRanker(ranker_config(cfg, prep), prep.data.item_attributes, prep.item_words,
                         item_codes=lm.codes if lm is not None and lm.level_sizes else None,
                         item_text=lm.text if lm is not None and cfg.model.text_features else None)


def validate(ranker: UnifiedRanker, prep: Prepared, tasks: list[Task], cfg: Config) -> dict[str, dict]:
    scorer = ModelScorer(ranker)
    return {TASK_NAMES[t]: evaluate_task(scorer, t, prep.split.valid, prep.builder, ks=cfg.eval.ks,
                                         max_users=cfg.train.eval_users, num_bootstrap=0, seed=cfg.train.seed)
            for t in tasks}


def selection_score(metrics: dict[str, dict]) -> float:
    """Model selection: mean validation NDCG@10 over the trained tasks."""
    return float(np.mean([m["ndcg@10"]["mean"] for m in metrics.values()]))


def parameter_groups(ranker: UnifiedRanker, cfg: Config) -> list[dict]:
    """A fine-tuned pretrained encoder takes a much smaller step than the freshly initialised rest;
    `train.id_weight_decay`, when set, gives the item-id table a decay of its own;
    `train.decay_norms_and_biases=false` takes the 1-D weights (LayerNorm gains, biases) out of the
    decay, so it cannot shrink the scale of the normalised context and item vectors (the logits)."""
    encoder = [p for n, p in ranker.named_parameters() if n.startswith("query_encoder.") and p.requires_grad]
    id_table = [] if cfg.train.id_weight_decay is None else [ranker.item_tower.id_table()]
    ids = {id(p) for p in encoder + id_table}
    rest = [p for p in ranker.parameters() if p.requires_grad and id(p) not in ids]
    no_decay = [] if cfg.train.decay_norms_and_biases else [p for p in rest if p.dim() <= 1]
    rest = [p for p in rest if p.dim() > 1 or cfg.train.decay_norms_and_biases]
    return ([{"params": rest}] + ([{"params": encoder, "lr": cfg.train.encoder_lr}] if encoder else [])
            + ([{"params": id_table, "weight_decay": cfg.train.id_weight_decay}] if id_table else [])
            + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else []))


def make_optimizer(ranker: UnifiedRanker, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(ranker, cfg), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


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

    def __init__(self, model: torch.nn.Module, decay: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)

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


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_validation: dict
    history: list[dict]
    seconds: float


def train(cfg: Config, prep: Prepared | None = None, quiet: bool = False) -> TrainResult:
    t0 = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    prep = prep or prepare(cfg)
    tasks = [TASK_BY_NAME[t] for t in cfg.train.tasks]
    weights = {task: cfg.train.task_weights[int(task)] for task in tasks}
    ranker = build_ranker(cfg, prep)
    examples = TrainingExamples(prep.split, prep.builder, cfg.train.batch_size, cfg.train.seed, tuple(tasks))
    if Task.SIMILAR in tasks and not (examples.lengths >= 2).any():
        raise ValueError("similar-item training needs users with >= 2 training items")
    item_freq = item_frequencies(prep.split.train, prep.data.num_items)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    excluded = None if prep.excluded_items is None else torch.as_tensor(prep.excluded_items, dtype=torch.int64)
    teachers = None
    if cfg.train.distill_from:
        teachers = load_teachers(cfg.train.distill_from, cfg.train.distill_weight, cfg.train.distill_temperature,
                                 fingerprint=prep.data.fingerprint(), num_items=prep.data.num_items,
                                 tokenizer_state=prep.tokenizer.to_dict(), max_history=cfg.model.max_history)
    optimizer = make_optimizer(ranker, cfg)
    average = WeightAverage(ranker, cfg.train.ema_decay) if cfg.train.ema_decay else None
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # the config's, even after a resume
    total_steps = cfg.train.max_epochs * examples.steps_per_epoch()

    out = Path(cfg.train.out_dir)
    ckpt = out / "best.pt"
    best, best_epoch, bad_rounds, history, step = -1.0, 0, 0, [], 0
    first_epoch = 1
    if cfg.train.init_from:
        # Weights and optimizer continue; the data order is re-drawn, so a continued run is not
        # bit-identical to an uninterrupted one (the distributed trainer resumes exactly).
        loaded = load_checkpoint(cfg.train.init_from, expect=ranker.config)
        ranker.load_state_dict(loaded.ranker.state_dict())
        if loaded.optimizer_state:
            try:
                optimizer.load_state_dict(loaded.optimizer_state)
            except ValueError as err:  # PyTorch's message names no option
                raise CheckpointError(
                    f"{cfg.train.init_from}: its optimizer state does not fit this run's parameter groups "
                    f"({err}); train.id_weight_decay, train.decay_norms_and_biases and model.query_encoder "
                    "must be set as in the run that wrote it") from err
        best_epoch = loaded.metadata.get("epoch", 0)
        best, first_epoch = selection_score(loaded.metadata["validation"]), best_epoch + 1
        step = best_epoch * examples.steps_per_epoch()  # the schedule continues where it was
    # Written only once the resumed checkpoint has loaded, so a refused resume leaves its run as it was.
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    writer = SummaryWriter(str(out / "tensorboard"))
    best_row: dict = {"epoch": best_epoch, "score": best} if best_epoch else {}
    metadata = {"dataset": prep.data.name, "fingerprint": prep.data.fingerprint(), "tasks": cfg.train.tasks}

    for epoch in range(first_epoch, cfg.train.max_epochs + 1):
        ranker.train()
        bar = tqdm(examples.epoch(), total=examples.steps_per_epoch(), desc=f"epoch {epoch}", disable=quiet,
                   leave=False)
        for batch in bar:
            factor = lr_factor(step, total_steps, cfg)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            loss, losses = softmax_loss(ranker, batch, cfg.train.num_negatives, item_freq, generator, weights,
                                        excluded_items=excluded, mask_seen=cfg.train.mask_seen,
                                        future_window=cfg.train.future_window, future_weight=cfg.train.future_weight,
                                        label_smoothing=cfg.train.label_smoothing, teachers=teachers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update()
            step += 1
            for task, value in losses.items():
                writer.add_scalar(f"loss/{TASK_NAMES[task]}", value.item(), step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        over_budget = cfg.train.max_minutes is not None and time.time() - t0 > 60 * cfg.train.max_minutes
        if epoch % cfg.train.eval_every and not over_budget and epoch != cfg.train.max_epochs:
            continue
        with average.swapped() if average is not None else nullcontext():  # the average is validated and saved
            metrics = validate(ranker, prep, tasks, cfg)
            score = selection_score(metrics)
            if score > best:
                save_checkpoint(ckpt, ranker, prep.tokenizer, prep.data.item_attributes, prep.item_words,
                                to_yaml(cfg), {**metadata, "epoch": epoch, "validation": metrics}, optimizer)
        row = {"epoch": epoch, "step": step, "seconds": round(time.time() - t0, 1), "score": score,
               **{f"{t}/{k}": m[k]["mean"] for t, m in metrics.items() for k in ("recall@10", "ndcg@10")}}
        history.append(row)
        (out / "train_history.json").write_text(json.dumps(history, indent=1))  # kept if the run is stopped
        for key, value in row.items():
            if "/" in key:
                writer.add_scalar(f"valid/{key}", value, step)
        if not quiet:
            print(json.dumps(row))
        if score > best:
            best, best_epoch, best_row, bad_rounds = score, epoch, row, 0
        else:
            bad_rounds += 1
        if bad_rounds >= cfg.train.patience or over_budget:
            break
    writer.close()
    return TrainResult(ckpt, best_epoch, best_row, history, time.time() - t0)
