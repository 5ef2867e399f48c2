"""Typed run configuration: YAML files in configs/ + `key=value` command-line overrides, validated
at load (unknown keys and wrong types are errors that name the key). A YAML file may start from
other configs (`defaults: [fast]`: a packaged config's name, or a file path relative to it) and
then lists only what it changes; what no file sets is the dataclass default below."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASK_CHOICES = ("search", "similar", "prequery", "suggest")
IMPL_CHOICES = ("auto", "reference", "triton")
BAG_IMPL_CHOICES = ("auto", "torch", "triton")
LEXICAL_FIELDS = ("none", "names", "title+names")  # model.lexical: which item text the BM25 match reads
# model settings that only change inference (no weight depends on them): a checkpoint takes the caller's
INFERENCE_SETTINGS = ("fresh_boost", "fresh_max_count", "fresh_neighbours")
ITEM_TASKS = TASK_CHOICES[:3]  # the default train.tasks: suggest (query suggestions) is opt-in


class ConfigError(ValueError):
    pass


@dataclass
class SyntheticConfig:
    num_users: int = 600
    num_items: int = 400
    num_topics: int = 8
    num_brands: int = 30
    mean_length: float = 12.0
    seed: int = 0


@dataclass
class DataConfig:
    path: str = "synthetic"  # a dataset directory, or "synthetic"
    format: str = "auto"  # auto | amazon | movielens | synthetic
    cache_dir: str = "~/.cache/unirank"  # text-encoder item vectors, keyed by a hash of model files + texts
    # Zero-shot search (docs/PROTOCOL.md): attribute names with crc32(name) % zero_shot_modulus == 0 never
    # appear in a training query; test queries built from them alone form the zero-shot set. 0 = off.
    zero_shot_modulus: int = 10
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """Hyperparameters: the `model:` section of a run config."""

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    ffn_mult: int = 4
    block: str = "prenorm"  # "prenorm" (pre-LN residual, GELU MLP) or "ligr" (gated residuals, SwiGLU MLP)
    # share of each block's token mixing given to a causal low-pass filter beside attention (model/ranker.py
    # CausalFilter: the frequency-domain mixing of BSARec in a causal form); 0 = attention only
    filter_mix: float = 0.0
    # a residual SwiGLU head per task on the blocks' output (model/ranker.py TaskHeads): each surface
    # gets width of its own on top of the shared blocks; zero-initialised, so it starts as the shared
    # model. 0 = off (every task reads the shared output)
    task_heads: int = 0
    dropout: float = 0.2
    max_history: int = 50
    max_query_len: int = 16
    use_attributes: bool = True
    use_words: bool = True
    similarity: str = "dot"  # "dot" or "cosine"
    temperature: float = 1.0  # divides the scores (cosine needs << 1)
    # implementation switches (same weights, same numbers): "auto" = the Triton kernels on CUDA, plain torch on CPU
    attention_impl: str = "auto"  # "auto" | "reference" (torch SDPA) | "triton" (kernels/attention)
    embedding_bag_impl: str = "auto"  # "auto" | "torch" (F.embedding_bag) | "triton" (kernels/embedding_bag); unsharded tables
    # LM features (model/text_encoder.py, model/semantic_ids.py)
    tokenizer: str = "word"  # "word" (letter runs, vocabulary fitted on the catalogue) or "wordpiece" (the text encoder's)
    text_features: bool = False  # item tower adds a projection of the frozen text-encoder vector of the item's content
    semantic_id_levels: int = 0  # RQ-KMeans levels of semantic-ID tables in the item tower (0 = off; + a collision level)
    query_encoder: str = "none"  # search context adds the text encoder's query vector: "none" | "frozen" | "finetune"
    query_bag: bool = True  # search context includes the pooled query-token bag
    tie_text_projection: bool = False  # query vector and item text vectors share one projection (one space)
    id_dropout: float = 0.0  # training: drop an item's id vector with this probability (content must carry it)
    lexical: str = "none"  # search score adds learned-scale BM25 of the query against the items' "names" or "title+names"
    text_neighbours: int = 0  # similar-item / pre-query scores add w_task * text cosine for the anchor's K nearest items
    content_distill: float = 0.0  # training: + w * mean ||content(i) - full(i).detach()||^2 over the step's target items
    # Fresh items (inference only: the loss never sees it; `unirank export --fresh-boost` changes it without
    # retraining): + fresh_boost to the score of every item with at most fresh_max_count training
    # interactions (new items added at export have none). 0 = off.
    fresh_boost: float = 0.0
    fresh_max_count: int = 0
    # > 0: the boost goes only to the fresh_neighbours fresh items whose text is nearest the row's anchor
    # (the similar-item source, the newest pre-query history item; search rows get none): a candidate
    # union of the model's ranking and the anchor's content-nearest fresh items, scored as one. 0 = every
    # fresh item on every row.
    fresh_neighbours: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        choices = {"block": ("prenorm", "ligr"), "similarity": ("dot", "cosine"), "attention_impl": IMPL_CHOICES,
                   "embedding_bag_impl": BAG_IMPL_CHOICES, "tokenizer": ("word", "wordpiece"),
                   "query_encoder": ("none", "frozen", "finetune"), "lexical": LEXICAL_FIELDS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.max_history < 1 or self.max_query_len < 1:
            raise ValueError("model.max_history and model.max_query_len must be >= 1")
        if self.query_encoder != "none" and self.tokenizer != "wordpiece":
            raise ValueError("model.query_encoder needs model.tokenizer=wordpiece (the encoder reads its own word pieces)")
        if not self.query_bag and self.query_encoder == "none":
            raise ValueError("model.query_bag=false needs a model.query_encoder: search would have no query signal")
        if self.tie_text_projection and not (self.text_features and self.query_encoder != "none"):
            raise ValueError("model.tie_text_projection needs model.text_features=true and a model.query_encoder")
        if self.text_neighbours < 0:
            raise ValueError("model.text_neighbours must be >= 0")
        if self.text_neighbours and not self.text_features:
            raise ValueError("model.text_neighbours needs model.text_features=true (the items' text vectors)")
        if self.semantic_id_levels < 0:
            raise ValueError("model.semantic_id_levels must be >= 0")
        if self.content_distill < 0.0:
            raise ValueError(f"model.content_distill must be >= 0, got {self.content_distill}")
        if not 0.0 <= self.filter_mix <= 1.0:
            raise ValueError(f"model.filter_mix must be in [0, 1], got {self.filter_mix}")
        if self.task_heads < 0:
            raise ValueError(f"model.task_heads must be >= 0 (a head's hidden width), got {self.task_heads}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"model.id_dropout must be in [0, 1), got {self.id_dropout}")
        if not math.isfinite(self.fresh_boost):
            raise ValueError(f"model.fresh_boost must be a finite number, got {self.fresh_boost}")
        if self.fresh_max_count < 0:
            raise ValueError(f"model.fresh_max_count must be >= 0, got {self.fresh_max_count}")
        if self.fresh_neighbours < 0:
            raise ValueError(f"model.fresh_neighbours must be >= 0, got {self.fresh_neighbours}")
        if self.fresh_neighbours and not self.text_features:
            raise ValueError("model.fresh_neighbours needs model.text_features=true (the items' text vectors)")


@dataclass
class TrainConfig:
    tasks: list[str] = field(default_factory=lambda: list(ITEM_TASKS))  # + "suggest": the query catalogue task
    # in TASK_CHOICES order: search, similar, prequery, suggest (three weights: suggest weighs 1.0)
    task_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW (decoupled) decay of every weight, the tables' included
    id_weight_decay: Optional[float] = None  # decay of the item-id table alone; None = train.weight_decay
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at the run's last step)
    warmup_steps: int = 0  # linear warm-up from 0 over this many steps (both schedules)
    warmup_fraction: Optional[float] = None  # warm-up over this fraction of the run's steps, in place of warmup_steps
    encoder_lr: float = 5e-5  # learning rate of the text encoder's weights when model.query_encoder=finetune
    # The run's length (training/schedule.py): max_epochs, stretched on a small dataset to at least
    # min_steps optimizer updates (epochs = max(max_epochs, ceil(min_steps / steps per epoch))).
    max_epochs: int = 50
    min_steps: int = 0
    patience: int = 5  # validation rounds without improvement before stopping
    eval_every: int = 1  # epochs between validation rounds (at least)
    eval_rounds: int = 0  # > 0: about this many rounds, every max(eval_every, ceil(epochs / eval_rounds)) epochs
    eval_users: Optional[int] = None  # validation on a fixed random subset of users; None = all
    num_negatives: int = 0  # sampled softmax negatives; 0 = full softmax over the catalogue
    max_minutes: Optional[float] = None  # wall-clock budget
    init_from: Optional[str] = None  # start from a finished run's best.pt (weights + optimizer state)
    resume: bool = True  # an out_dir with a run's checkpoints continues it exactly (false: refuse to touch it)
    checkpoint_every: int = 0  # also write the resumable checkpoint every N steps (0 = end of each epoch only)
    keep_checkpoints: int = 2  # resumable checkpoints kept besides the best one
    stop_after_steps: Optional[int] = None  # stop (after checkpointing) at this global step: tests / demos
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast of the dense part on CUDA, fp32 on CPU) | fp32 | bf16
    seed: int = 42
    threads: Optional[int] = None
    out_dir: str = "runs/default"


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    num_bootstrap: int = 1000
    baselines: bool = True
    checkpoint: Optional[str] = None  # defaults to <out_dir>/best.pt


@dataclass
class TableShardingConfig:
    """Per-table sharding constraints (TorchRec ParameterConstraints) for distributed training."""

    sharding_types: list[str] = field(default_factory=list)  # allowed ShardingType values; [] = distributed.sharding_types
    min_partition: Optional[int] = None  # smallest column-wise shard width
    rows: Optional[int] = None  # hashed-table capacity (>= the rows the data needs); None = what the data needs


@dataclass
class DistributedConfig:
    """Several ranks (`unirank train --nproc-per-node N`, or torchrun): the sharding plan of the
    embedding tables (docs/DISTRIBUTED.md). One process ignores it."""

    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    sharding_types: list[str] = field(default_factory=list)  # allowed ShardingType values; [] = what the table optimizer allows
    tables: Dict[str, TableShardingConfig] = field(default_factory=dict)  # item_id | attribute | word | sid_<l>
    memory_budget_gb: Optional[float] = None  # per-rank embedding memory the planner may use; None = planner default
    expect_world_size: Optional[int] = None  # refuse to start on another world size
    # adamw: the tables take the dense part's AdamW (its param groups and decays): data_parallel tables
    # on CPU (TorchRec's dense kernel), FBGEMM's fused Adam with decoupled decay on GPU (any sharding).
    # adagrad | rowwise_adagrad | sgd: FBGEMM's fused CPU/GPU optimizers, for model-parallel tables on CPU.
    sparse_optimizer: str = "adamw"
    sparse_lr: float = 0.05  # learning rate of the fused adagrad / rowwise_adagrad / sgd tables
    checkpoint_dir: Optional[str] = None  # default <train.out_dir>/checkpoints
    consolidate: bool = True  # sharded tables: at the end, rank 0 writes <out_dir>/best.pt (single-file format)
    timeout_s: int = 600  # collective timeout: a dead rank turns into an error, not a hang


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def builtin_config(name: str) -> Path:
    # configs/ sits beside this file both in the source tree and when installed (unirank/configs).
    return Path(__file__).resolve().parent / "configs" / f"{name}.yaml"


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Schema <- YAML file (a path, or the name of a packaged config) with its `defaults` bases
    resolved <- `a.b=value` overrides."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path:
            merged = OmegaConf.merge(merged, _composed(_config_file(path, None), ()))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)  # runs the dataclasses' own checks too
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"invalid config{f' {path}' if path else ''}: {err}".replace("\n", " | ")) from err
    validate(cfg)
    return cfg


def _config_file(name: str, parent: Path | None) -> Path:
    """A config named on the command line or in a `defaults` list: a file (relative to the config
    that names it), else a packaged config's name."""
    file = Path(name) if parent is None else parent.parent / name
    if not file.is_file() and not name.endswith(".yaml"):
        file = builtin_config(name)
    if not file.is_file():
        where = f" (in the defaults of {parent})" if parent is not None else ""
        packaged = sorted(p.stem for p in builtin_config("default").parent.glob("*.yaml"))
        raise ConfigError(f"config file not found: {name}{where}; packaged configs: {', '.join(packaged)}")
    return file.resolve()


def _composed(file: Path, chain: tuple[Path, ...]) -> DictConfig:
    """The YAML of `file` merged over its `defaults` bases (in order), each resolved the same way."""
    if file in chain:
        raise ConfigError(f"config defaults form a cycle: {' -> '.join(p.name for p in chain + (file,))}")
    node = OmegaConf.load(file)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{file}: a config file must be a mapping of sections")
    bases = node.pop("defaults", [])
    if OmegaConf.is_list(bases):
        bases = list(bases)
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{file}: defaults must be a list of config names, got {bases!r}")
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _composed(_config_file(base, file), chain + (file,)))
    return OmegaConf.merge(merged, node)


def validate(cfg: Config) -> None:
    if cfg.data.zero_shot_modulus < 0:
        raise ConfigError(f"data.zero_shot_modulus must be >= 0 (0 = no zero-shot split), got {cfg.data.zero_shot_modulus}")
    unknown = [t for t in cfg.train.tasks if t not in TASK_CHOICES]
    if unknown or not cfg.train.tasks:
        raise ConfigError(f"train.tasks must be a non-empty subset of {TASK_CHOICES}, got {cfg.train.tasks}")
    if len(cfg.train.task_weights) not in (len(ITEM_TASKS), len(TASK_CHOICES)):
        raise ConfigError(f"train.task_weights needs one weight per task {TASK_CHOICES} (or per item task {ITEM_TASKS})")
    for key in ("batch_size", "max_epochs", "eval_every"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1")
    if cfg.train.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be constant or cosine, got {cfg.train.lr_schedule!r}")
    if cfg.train.warmup_steps < 0:
        raise ConfigError("train.warmup_steps must be >= 0")
    if cfg.train.warmup_fraction is not None and not 0.0 <= cfg.train.warmup_fraction < 1.0:
        raise ConfigError(f"train.warmup_fraction must be in [0, 1), got {cfg.train.warmup_fraction}")
    if cfg.train.min_steps < 0 or cfg.train.eval_rounds < 0:
        raise ConfigError(f"train.min_steps and train.eval_rounds must be >= 0 (0 = off), got "
                          f"{cfg.train.min_steps} and {cfg.train.eval_rounds}")
    if cfg.train.num_negatives < 0:
        raise ConfigError("train.num_negatives must be >= 0 (0 = full softmax)")
    if cfg.train.weight_decay < 0 or (cfg.train.id_weight_decay is not None and cfg.train.id_weight_decay < 0):
        raise ConfigError("train.weight_decay and train.id_weight_decay must be >= 0, got "
                          f"{cfg.train.weight_decay} and {cfg.train.id_weight_decay}")
    if cfg.train.device not in ("auto", "cpu", "cuda") or cfg.train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.device must be auto, cpu or cuda and train.precision auto, fp32 or bf16, got "
                          f"{cfg.train.device!r} and {cfg.train.precision!r}")
    if cfg.train.checkpoint_every < 0 or cfg.train.keep_checkpoints < 1:
        raise ConfigError("train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1")


def task_weights(train: TrainConfig) -> dict[str, float]:
    """{task name: weight}; a list of the item tasks' weights alone leaves suggest at 1.0."""
    weights = list(train.task_weights) + [1.0] * (len(TASK_CHOICES) - len(train.task_weights))
    return dict(zip(TASK_CHOICES, (float(w) for w in weights)))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
