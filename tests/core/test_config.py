"""Configs by composition: a YAML file lists only what it changes from its `defaults` bases (or from
the dataclass defaults), and resolves to the values the packaged recipes are measured with."""
from __future__ import annotations

import dataclasses

import pytest

from unirank.config import Config, ConfigError, load_config

BEAUTY = "../shared/data/amazon-beauty"
COSINE_36 = {"data.path": BEAUTY, "train.lr": 0.002, "train.lr_schedule": "cosine", "train.warmup_steps": 200,
             "train.max_epochs": 36, "train.eval_every": 2, "train.eval_users": 5000}
FAST = {**COSINE_36, "model.block": "ligr", "train.max_epochs": 9, "train.eval_every": 9,
        "train.min_steps": 500, "train.eval_rounds": 10, "train.out_dir": "runs/fast"}
RECOMMENDED = {**FAST, "model.tokenizer": "wordpiece", "model.text_features": True, "model.lexical": "names",
               "model.text_neighbours": 50, "model.dropout": 0.3, "model.id_dropout": 0.2,
               "train.weight_decay": 0.1, "train.id_weight_decay": 0.3, "train.max_epochs": 27,
               "train.eval_every": 3, "train.task_weights": [1.0, 1.0, 3.0], "train.out_dir": "runs/recommended"}
# every packaged config: the values that differ from the dataclass defaults, once resolved
RESOLVED = {
    "default": COSINE_36,
    "fast": FAST,
    "recommended": RECOMMENDED,
    "fresh-catalogue": {**RECOMMENDED, "model.content_distill": 1.0, "model.semantic_id_levels": 3,
                        "model.fresh_boost": 1.5, "model.fresh_neighbours": 10,
                        "train.out_dir": "runs/fresh-catalogue"},
    "quality": {**COSINE_36, "model.block": "ligr", "model.dropout": 0.3, "model.text_features": True,
                "model.id_dropout": 0.2, "train.weight_decay": 0.1, "train.id_weight_decay": 0.3,
                "train.eval_every": 4, "train.out_dir": "runs/quality"},
    "lm": {"data.path": BEAUTY, "train.lr": 0.002, "train.eval_every": 2, "train.eval_users": 5000,
           "model.tokenizer": "wordpiece", "model.text_features": True, "model.semantic_id_levels": 3,
           "model.query_encoder": "frozen", "train.max_epochs": 200, "train.out_dir": "runs/lm"},  # constant rate
    "scale": {"data.synthetic.num_users": 2000, "data.synthetic.num_items": 2000, "model.dim": 16,
              "model.max_history": 20, "train.max_epochs": 1, "train.eval_users": 500, "train.threads": 1,
              "train.keep_checkpoints": 1, "train.out_dir": "runs/scale", "distributed.memory_budget_gb": 4.0,
              "distributed.sharding_types": ["table_wise", "column_wise", "table_column_wise"],
              "distributed.tables": {"item_id": {"rows": 30000000, "sharding_types": ["column_wise"],
                                                 "min_partition": 8},
                                     "word": {"rows": 10000000, "sharding_types": ["column_wise"],
                                              "min_partition": 8},
                                     "attribute": {"rows": 1000000, "sharding_types": ["table_wise"],
                                                   "min_partition": None}},
              "distributed.sparse_optimizer": "adagrad", "distributed.consolidate": False},
}


def flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "tables":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_from_defaults(cfg: Config) -> dict:
    defaults = flat(dataclasses.asdict(Config()))
    return {k: v for k, v in flat(dataclasses.asdict(cfg)).items() if v != defaults[k]}


def quickstart_changes() -> dict:
    return {"model.dim": 32, "model.max_history": 20, "train.batch_size": 64, "train.lr": 0.003,
            "train.max_epochs": 60, "train.out_dir": "runs/quickstart", "eval.num_bootstrap": 200,
            "model.lexical": "names"}


@pytest.mark.parametrize("name", sorted(RESOLVED) + ["quickstart"])
def test_each_packaged_config_resolves_to_its_recipe(name):
    expected = RESOLVED.get(name) or quickstart_changes()
    assert changed_from_defaults(load_config(name)) == expected


def test_a_config_lists_only_what_it_changes_from_its_base(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults: [fast]\ntrain:\n  max_epochs: 3\n")
    cfg = load_config(str(tmp_path / "mine.yaml"), ["model.dim=8"])
    assert changed_from_defaults(cfg) == {**FAST, "train.max_epochs": 3, "model.dim": 8}


def test_bases_merge_in_order_and_resolve_beside_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  dim: 8\n  num_layers: 3\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\nmodel:\n  dim: 12\n")
    (tmp_path / "c.yaml").write_text("defaults: [b.yaml, quickstart]\n")
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.model.dim, cfg.model.num_layers, cfg.train.batch_size) == (32, 3, 64)  # quickstart is merged last


def test_a_defaults_cycle_is_refused_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml -> b\.yaml -> a\.yaml"):
        load_config(str(tmp_path / "a.yaml"))


def test_an_unknown_base_is_refused_naming_it_and_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [no_such_base]\n")
    with pytest.raises(ConfigError, match=r"no_such_base \(in the defaults of .*a\.yaml\).*packaged configs: .*fast"):
        load_config(str(tmp_path / "a.yaml"))


def test_defaults_must_be_a_list_of_names_and_unknown_keys_stay_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: fast\n")
    with pytest.raises(ConfigError, match="defaults must be a list"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("defaults: [fast]\ntrain:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(str(tmp_path / "b.yaml"))
