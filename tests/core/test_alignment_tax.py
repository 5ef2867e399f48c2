"""benchmarks/alignment_tax.py: unified minus twin paired by seed, from two benchmark reports."""
from __future__ import annotations

import importlib.util
import json

import pytest

from core_data import REPO

SPEC = importlib.util.spec_from_file_location("alignment_tax", REPO / "benchmarks" / "alignment_tax.py")
alignment_tax = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(alignment_tax)


def report(path, values: dict[int, float], dataset="beauty") -> str:
    runs = [{"seed": s, "test": {"prequery": {"recall@10": {"mean": 2 * v, "ci95": [0, 1]},
                                             "ndcg@10": {"mean": v, "ci95": [0, 1]}}}} for s, v in values.items()]
    path.write_text(json.dumps({"dataset": dataset, "data": {"split": 0}, "config": "recommended",
                                "run": {"command": "unirank benchmark"}, "runs": runs}))
    return str(path)


def test_differences_are_paired_by_seed(tmp_path):
    unified = report(tmp_path / "u.json", {42: 0.060, 43: 0.058, 44: 0.059})
    twin = report(tmp_path / "t.json", {44: 0.058, 42: 0.057, 43: 0.058})  # another order: paired by seed
    assert alignment_tax.main(["--unified", unified, "--twin", f"prequery={twin}", "--out", str(tmp_path / "o.json")]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    row = out["alignment"]["prequery"]
    assert out["seeds"] == [42, 43, 44] and out["per_seed"]["prequery"]["ndcg@10"]["twin"] == [0.057, 0.058, 0.058]
    assert row["ndcg@10"]["values"] == pytest.approx([0.003, 0.0, 0.001])
    assert row["ndcg@10"]["mean"] == pytest.approx(0.004 / 3)
    low, high = row["ndcg@10"]["t95"]  # mean ± 4.303 * std / sqrt(3)
    assert high - low == pytest.approx(2 * 4.303 * 0.0015275 / 3 ** 0.5, rel=1e-3)
    assert row["recall@10"]["values"] == pytest.approx([0.006, 0.0, 0.002])


def test_unmatched_seeds_and_bad_files_are_refused(tmp_path):
    unified = report(tmp_path / "u.json", {42: 0.06, 43: 0.06})
    with pytest.raises(SystemExit, match="seeds differ"):
        alignment_tax.main(["--unified", unified, "--twin", f"prequery={report(tmp_path / 't.json', {42: 0.05})}",
                            "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match="another dataset"):
        alignment_tax.main(["--unified", unified, "--twin",
                            f"prequery={report(tmp_path / 'm.json', {42: 0.05, 43: 0.05}, dataset='ml')}",
                            "--out", str(tmp_path / "o.json")])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="bad.json"):
        alignment_tax.main(["--unified", str(tmp_path / "bad.json"), "--twin", f"prequery={unified}",
                            "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match="TASK=JSON"):
        alignment_tax.main(["--unified", unified, "--twin", "prequery", "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()
