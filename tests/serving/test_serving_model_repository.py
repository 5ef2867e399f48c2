"""Generated Triton configs: parse against Triton's protobuf schema, agree with the ONNX graph,
and broken repositories are rejected with a message naming the problem."""
from __future__ import annotations

import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from unirank.model.tokenizer import WordTokenizer
from unirank.serving.model_repository import (InvalidModelRepository, build_model_repository, read_model_config,
                                              validate_model_repository)

ROW_INPUTS = {"task", "history_lengths", "query_lengths", "source_item", "exclude_lengths"}


def _io(config: pb.ModelConfig):
    return ([(t.name, t.data_type, list(t.dims)) for t in config.input],
            [(t.name, t.data_type, list(t.dims)) for t in config.output])


def test_both_flavours_share_the_endpoint_contract(repositories):
    python = read_model_config(repositories["python"] / "unirank" / "config.pbtxt")
    onnxruntime = read_model_config(repositories["onnxruntime"] / "unirank" / "config.pbtxt")
    assert python.backend == "python" and not python.platform
    assert onnxruntime.platform == "onnxruntime_onnx" and not onnxruntime.backend
    # The python flavour fixes each sequence's width at its limit (Triton refuses any other shape
    # before the python backend; a variable dim let an overflowing shape crash its stub).
    sequences = ("history", "query", "candidates", "exclude")
    assert {n: d for n, _, d in _io(python)[0] if n in sequences} == {
        "history": [12], "query": [6], "candidates": [10_000], "exclude": [1_000]}
    # The ONNX Runtime flavour fixes the history alone: no request of 0 rows fits its shapes.
    variable = lambda io: [(n, t, [-1] if n in sequences[1:] else d) for n, t, d in io[0]]  # noqa: E731
    assert variable(_io(python)) == _io(onnxruntime)[0] and _io(python)[1] == _io(onnxruntime)[1]
    inputs, outputs = _io(onnxruntime)
    assert [n for n, _, _ in inputs] == ["task", "history", "history_lengths", "query", "query_lengths", "source_item",
                                          "candidates", "exclude", "exclude_lengths"]
    assert {d for _, d, _ in inputs} == {pb.TYPE_INT64}
    assert outputs == [("item_ids", pb.TYPE_INT64, [20]), ("scores", pb.TYPE_FP32, [20])]
    for config in (python, onnxruntime):
        assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
        for tensor in config.input:
            # Row fields are [B, 1]; the python model squeezes them itself, so that Triton refuses
            # 0-row batches before they reach the python backend.
            assert tensor.HasField("reshape") == (tensor.name in ROW_INPUTS and config is onnxruntime)
    assert not any(t.allow_ragged_batch for t in (*python.input, *onnxruntime.input))


def test_repository_ships_model_tokenizer_and_backend_files(repositories, tokenizer):
    for flavour, root in repositories.items():
        model_dir = root / "unirank"
        assert (model_dir / "1" / "model.onnx").exists()
        assert WordTokenizer.load(model_dir / "tokenizer.json").words == tokenizer.words
        assert (model_dir / "1" / "model.py").exists() == (flavour == "python")
    assert set(validate_model_repository(repositories["python"])) == {"unirank"}


@pytest.fixture
def broken_copy(tmp_path, repositories):
    root = tmp_path / "repo"
    shutil.copytree(repositories["python"], root)
    return root


def _edit_config(root, edit):
    path = root / "unirank" / "config.pbtxt"
    config = read_model_config(path)
    edit(config)
    path.write_text(text_format.MessageToString(config))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.input[0].__setattr__("data_type", pb.TYPE_INT32), "input task: TYPE_INT32"),
    (lambda c: c.input[1].__setattr__("name", "histories"), "input names"),
    (lambda c: c.input[1].dims.append(3), "input history: rank 3 but ONNX rank 2"),
    (lambda c: c.output[1].dims.__setitem__(0, 7), "output scores: dims [7]"),
    (lambda c: c.__setattr__("name", "other"), "config name 'other'"),
])
def test_inconsistent_configs_are_rejected(broken_copy, edit, message):
    _edit_config(broken_copy, edit)
    with pytest.raises(InvalidModelRepository, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_model_repository(broken_copy)


def test_schema_errors_and_missing_files_are_rejected(broken_copy):
    config = broken_copy / "unirank" / "config.pbtxt"
    config.write_text(config.read_text().replace("KIND_CPU", "KIND_TPU"))
    with pytest.raises(InvalidModelRepository, match="KIND_TPU"):
        validate_model_repository(broken_copy)
    config.write_text(config.read_text().replace("KIND_TPU", "KIND_CPU") + "\nmax_batch: 3\n")
    with pytest.raises(InvalidModelRepository, match="max_batch"):
        validate_model_repository(broken_copy)
    config.write_text(config.read_text().replace("\nmax_batch: 3\n", ""))
    validate_model_repository(broken_copy)  # repaired
    (broken_copy / "unirank" / "1" / "model.onnx").unlink()
    with pytest.raises(InvalidModelRepository, match="model.onnx missing"):
        validate_model_repository(broken_copy)


def test_production_options_reach_both_configs(tmp_path, export_dir):
    repos = build_model_repository(export_dir, tmp_path, max_batch_size=128, instance_count=2, device="gpu",
                                   ort_threads=4, preferred_batch_sizes=(8, 32), graph_optimization="ORT_ENABLE_BASIC")
    python = read_model_config(repos["python"] / "unirank" / "config.pbtxt")
    onnxruntime = read_model_config(repos["onnxruntime"] / "unirank" / "config.pbtxt")
    for config in (python, onnxruntime):
        assert config.max_batch_size == 128 and list(config.dynamic_batching.preferred_batch_size) == [8, 32]
        assert config.instance_group[0].count == 2
        assert config.parameters["intra_op_thread_count"].string_value == "4"
        assert config.parameters["graph_optimization_level"].string_value == "ORT_ENABLE_BASIC"
    assert onnxruntime.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert python.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU  # the python model runs on CPU
    assert onnxruntime.optimization.graph.level == -1  # the onnxruntime backend's spelling of BASIC
    assert not python.HasField("optimization")


@pytest.mark.parametrize("options, message", [
    (dict(graph_optimization="fast"), "graph_optimization must be one of"),
    (dict(preferred_batch_sizes=(128,), max_batch_size=64), "preferred_batch_sizes"),
    (dict(device="tpu"), "device must be"),
])
def test_bad_production_options_are_refused(tmp_path, export_dir, options, message):
    with pytest.raises(ValueError, match=message):
        build_model_repository(export_dir, tmp_path, **options)


def test_export_command_takes_the_production_options():
    from unirank.cli.main import build_parser

    args = build_parser().parse_args(["export", "--checkpoint", "c.pt", "--out", "o", "--device", "gpu",
                                      "--max-batch-size", "256", "--instances", "2", "--preferred-batch-sizes", "16", "64"])
    assert (args.device, args.max_batch_size, args.instances, args.preferred_batch_sizes) == ("gpu", 256, 2, [16, 64])
