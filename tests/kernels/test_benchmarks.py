"""The kernel benchmarks refuse to print numbers without CUDA, and their --smoke mode runs through."""
import json
import subprocess
import sys

import pytest
import torch

BENCHMARKS = ["unirank.kernels.attention.benchmark", "unirank.kernels.embedding_bag.benchmark"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
@pytest.mark.parametrize("module", BENCHMARKS)
def test_exits_non_zero_without_cuda(module):
    result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("module", BENCHMARKS)
def test_smoke_mode_writes_a_report(module, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", module, "--smoke", "--out", str(out)], check=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["git_commit"] and report["rows"]
    assert {"triton_jagged", "triton_multi"} & {row["provider"] for row in report["rows"]}
