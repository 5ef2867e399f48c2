"""The served path of a model with every LM feature: semantic IDs and text vectors baked into the
exported item table, the frozen text encoder inside model.onnx, and the client tokenizing search
queries with the same word pieces. The quickstart job checks each gRPC answer against PyTorch."""
from __future__ import annotations

import json

import onnx
import pytest

from unirank.cli.quickstart import quickstart

LM = ["model.tokenizer=wordpiece", "model.query_encoder=frozen", "model.text_features=true",
      "model.semantic_id_levels=2"]


@pytest.mark.slow
def test_quickstart_with_lm_features_serves_pytorch_answers(tmp_path):
    rc = quickstart("quickstart", LM + [f"train.out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
                                        "train.max_epochs=3", "eval.num_bootstrap=20"])
    assert rc == 0  # every task's gRPC top-10 equals the PyTorch model's
    graph = onnx.load(str(tmp_path / "export" / "model.onnx"), load_external_data=False).graph
    shapes = {tuple(init.dims) for init in graph.initializer}
    assert (30522, 384) in shapes  # the encoder's word-piece embeddings: the query is encoded in the graph
    assert json.loads((tmp_path / "export" / "tokenizer.json").read_text())["type"] == "wordpiece"
    answers = json.loads((tmp_path / "quickstart.json").read_text())
    assert set(answers) == {"search", "similar", "prequery"}
