"""Bad input: configs, overrides, checkpoints (foreign, truncated, garbage, interrupted save) and the CLI."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from unirank.model.catalogue import Catalogue

from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.tokenizer import WordTokenizer
from unirank.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from unirank.cli.main import main
from unirank.config import ConfigError, load_config

# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[2] / "src" / "unirank" / "configs").glob("*.yaml")))
def test_every_packaged_config_loads(name):
    """A typo in a shipped config must fail here, not in a user's first run."""
    assert load_config(name).train.max_epochs >= 1


def test_unknown_config_key_names_the_key():
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(None, ["train.learning_rate=0.1"])
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(None, ["nonsense.key=1"])


def test_unknown_key_in_yaml_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dim: 32\n  depth: 3\n")
    with pytest.raises(ConfigError, match="depth") as err:
        load_config(str(path))
    assert str(path) in str(err.value)


def test_bad_override_syntax_and_types():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="lr"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.tasks"):
        load_config(None, ["train.tasks=[ads]"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_valid_overrides_apply():
    cfg = load_config("quickstart", ["train.lr=0.01", "train.tasks=[search,prequery]", "model.dim=8"])
    assert cfg.train.lr == 0.01 and cfg.train.tasks == ["search", "prequery"] and cfg.model.dim == 8
    assert cfg.data.path == "synthetic"  # from the packaged quickstart.yaml


# ---------------------------------------------------------------- checkpoints

NUM_ITEMS = 20


def _save(path, dim: int = 8, seed: int = 0) -> RankerConfig:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    attributes = [[]] + [rng.integers(1, 4, size=1).tolist() for _ in range(NUM_ITEMS)]
    words = [[]] + [[2, 3]] * NUM_ITEMS
    cfg = RankerConfig(num_items=NUM_ITEMS, num_attributes=4, num_words=6, dim=dim, num_heads=2, max_history=5)
    ranker = UnifiedRanker(cfg, Catalogue(attributes, words))
    tokenizer = WordTokenizer(["alpha", "beta", "gamma", "delta"]).to_dict()
    save_checkpoint(path, ranker, Catalogue(attributes, words, tokenizer=tokenizer), "model: {}\n", {"epoch": seed})
    return cfg


def test_checkpoint_roundtrip(tmp_path):
    path = tmp_path / "best.pt"
    cfg = _save(path)
    loaded = load_checkpoint(path, expect=cfg)
    assert loaded.ranker.config == cfg and loaded.metadata == {"epoch": 0}
    assert loaded.tokenizer.words == ["alpha", "beta", "gamma", "delta"]


def test_checkpoint_from_another_model_config_names_key_and_file(tmp_path):
    path = tmp_path / "best.pt"
    cfg = _save(path, dim=8)
    with pytest.raises(CheckpointError, match=r"dim: checkpoint=8 config=16") as err:
        load_checkpoint(path, expect=replace(cfg, dim=16))
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="num_items") as err:
        load_checkpoint(path, expect=replace(cfg, num_items=NUM_ITEMS + 1))
    assert "dim" not in str(err.value)  # only the keys that differ
    # an implementation switch is not a different model
    load_checkpoint(path, expect=replace(cfg, attention_impl="triton"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_damaged_checkpoint_is_refused_and_left_untouched(tmp_path, damage):
    good = tmp_path / "good.pt"
    _save(good)
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, bad)
    before = bad.read_bytes()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value)
    assert bad.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "good.pt"]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    _save(path, seed=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")  # a crash half-way through writing
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, seed=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).metadata == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind


# ---------------------------------------------------------------- CLI


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "\n" not in lines[0]
    return lines[0]


def test_cli_missing_dataset_dir(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--quiet", f"data.path={tmp_path / 'no_such_dataset'}", f"train.out_dir={out}"])
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("unirank train: error:") and "no_such_dataset" in line
    assert not out.exists()


def test_cli_unknown_config_key(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--quiet", "train.learnig_rate=0.1", f"train.out_dir={out}"])
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("unirank train: error:") and "learnig_rate" in line
    assert not out.exists()


def test_cli_bad_override_syntax(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["evaluate", "train.lr", f"train.out_dir={out}"]) == 2
    assert "key=value" in _one_error_line(capsys)
    assert not out.exists()


def test_cli_evaluate_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["evaluate", "data.synthetic.num_users=30", "data.synthetic.num_items=20",
                 f"train.out_dir={out}"])
    assert code == 2
    assert "best.pt" in _one_error_line(capsys)
    assert not (out / "eval_test.json").exists()


def test_cli_evaluate_checks_the_checkpoint_before_the_data(tmp_path, capsys):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    code = main(["evaluate", f"data.path={tmp_path / 'no-such-dataset'}", f"eval.checkpoint={bad}",
                 f"train.out_dir={tmp_path / 'run'}"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and "no-such-dataset" not in line


def test_cli_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
