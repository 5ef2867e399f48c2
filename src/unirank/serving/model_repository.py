"""Triton model repositories generated from one description: the endpoint contract is data here.

`build_model_repository` writes two standard repositories from the same `EndpointSpec`:
  <out>/python/<name>/       backend "python": model.py (ONNX Runtime, pads each batch itself)
                             for the bundled CPU tritonserver (no onnxruntime backend there);
  <out>/onnxruntime/<name>/  platform "onnxruntime_onnx" for the official Triton container.
Both hold 1/model.onnx (+ its external data file, model.onnx.data, when the weights pass 2 GB),
tokenizer.json and export.json, with identical input/output names and dtypes.
An export with an item index (serving/context_export.py) adds context.onnx and the index files to the
python model's version directory: that model then answers in two stages (serving/item_index.py).
Configs are built as `ModelConfig` protobuf messages, and `validate_model_repository` parses them back
and cross-checks them against the ONNX graph.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from unirank.model import request as request_schema
from unirank.model.request import MAX_CANDIDATES, MAX_EXCLUDE, ROW_FIELDS, SEQUENCE_LIMITS
from unirank.serving.metadata import (METADATA_FILE, METADATA_PARAMETER, MODEL_FILE, NEW_ITEMS_FILE, QUERIES_FILE,
                                      QUERIES_PARAMETER, TOKENIZER_FILE, TOKENIZER_PARAMETER, ExportMetadata,
                                      external_data_files)
from unirank.serving.item_index import CONTEXT_MODEL_FILE, INDEX_FILE, INDEX_FILES, INDEX_META_FILE, ITEM_TABLE_FILE
from unirank.serving.request_arrays import RequestLimits

FLAVOURS = ("python", "onnxruntime")
_HERE = Path(__file__).parent
_ONNX_TO_TRITON = {7: "TYPE_INT64", 1: "TYPE_FP32", 6: "TYPE_INT32", 10: "TYPE_FP16"}
# ONNX Runtime's graph optimization levels (onnxruntime.GraphOptimizationLevel names) and how the
# official container's onnxruntime backend spells them (`optimization { graph { level } }`; 0: its default, all).
GRAPH_OPTIMIZATION_LEVELS = {"ORT_ENABLE_ALL": 0, "ORT_ENABLE_EXTENDED": 1, "ORT_ENABLE_BASIC": -1, "ORT_DISABLE_ALL": 2}


class InvalidModelRepository(ValueError):
    """A model repository Triton would reject or serve wrongly; the message lists every problem."""


@dataclass
class EndpointSpec:
    """Everything both configs are generated from."""

    metadata: ExportMetadata
    name: str = "unirank"
    max_batch_size: int = 64
    dynamic_batching: bool = True  # False: one execution per request (for comparisons)
    max_queue_delay_us: int = 0  # 0: batch only what is already queued (best at low load on CPU)
    instance_count: int = 1
    device: str = "cpu"  # "cpu" or "gpu" (onnxruntime flavour only; the python model is CPU)
    ort_threads: int = 1  # intra-op threads per instance (inter-op: 1, the graph runs sequentially)
    preferred_batch_sizes: list[int] = field(default_factory=list)
    graph_optimization: str = "ORT_ENABLE_ALL"  # a GRAPH_OPTIMIZATION_LEVELS name
    tokenizer_json: str = ""  # served in the config's parameters, for clients (RankerClient.from_server)
    queries_json: str = ""  # the query catalogue's texts (suggest), served the same way

    def __post_init__(self):
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.ort_threads < 1:
            raise ValueError("max_batch_size, instance_count and ort_threads must be >= 1")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization must be one of {list(GRAPH_OPTIMIZATION_LEVELS)}, got {self.graph_optimization!r}")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes {self.preferred_batch_sizes} must lie in [1, max_batch_size {self.max_batch_size}]")


def model_config(spec: EndpointSpec, flavour: str) -> pb.ModelConfig:
    """The config.pbtxt message for one flavour."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    config = pb.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    python = flavour == "python"
    if python:
        config.backend = "python"
    else:
        config.platform = "onnxruntime_onnx"
    for name in spec.metadata.input_names:
        tensor = config.input.add(name=name, data_type=pb.TYPE_INT64)
        if name in ROW_FIELDS:
            # One value per row: clients send [B, 1]; the graph sees [B] (reshape, or the python model
            # squeezes them). Without a reshape Triton itself refuses a batch of 0 rows, which would
            # otherwise reach the python backend as all-empty inputs and crash tritonserver (SIGSEGV).
            tensor.dims.append(1)
            if not python:
                tensor.reshape.SetInParent()
        elif python or name == "history":
            # Fixed at its limit. The python flavour: every sequence (see sequence_widths). The ONNX
            # Runtime flavour: the history, so that no request of 0 rows fits its shapes (Triton lets
            # [0, 0] through a variable dim, and 0 rows of zero-width sequences crashed tritonserver).
            tensor.dims.append(sequence_widths(spec.metadata)[name])
        else:
            # The ONNX Runtime backend cannot pad: its batcher only merges equal shapes (clients bucket).
            tensor.dims.append(-1)
    k = spec.metadata.top_k
    config.output.add(name="item_ids", data_type=pb.TYPE_INT64, dims=[k])
    config.output.add(name="scores", data_type=pb.TYPE_FP32, dims=[k])
    if spec.dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(spec.preferred_batch_sizes)
    gpu = spec.device == "gpu" and not python
    config.instance_group.add(count=spec.instance_count, kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU)
    # ONNX Runtime session options, the same for both flavours (the python model reads the parameters).
    config.parameters["intra_op_thread_count"].string_value = str(spec.ort_threads)
    config.parameters["inter_op_thread_count"].string_value = "1"
    config.parameters["graph_optimization_level"].string_value = spec.graph_optimization
    if not python and GRAPH_OPTIMIZATION_LEVELS[spec.graph_optimization]:
        config.optimization.graph.level = GRAPH_OPTIMIZATION_LEVELS[spec.graph_optimization]
    # What a client needs (limits, names, tokenizer), readable through the model config API.
    config.parameters[METADATA_PARAMETER].string_value = json.dumps(asdict(spec.metadata))
    if spec.tokenizer_json:
        config.parameters[TOKENIZER_PARAMETER].string_value = spec.tokenizer_json
    if spec.queries_json:
        config.parameters[QUERIES_PARAMETER].string_value = spec.queries_json
    return config


def sequence_widths(metadata: ExportMetadata) -> dict[str, int]:
    """The python flavour's fixed width of every sequence input: its limit. Triton checks an input's
    byte size against a wrapping int64 product of its shape, so a variable dim let [1, 2**61] with
    0 bytes through, and the python backend's stub aborted building that array before model.py ran;
    a shape that differs from a fixed dim is refused by Triton itself (INVALID_ARGUMENT naming the input)."""
    limits = RequestLimits(metadata.num_items, metadata.max_history, metadata.max_query_len, num_queries=metadata.num_queries)
    widths = {**{name: limits.resolve(limit) for name, limit in SEQUENCE_LIMITS.items()},
              "candidates": MAX_CANDIDATES, "exclude": MAX_EXCLUDE}
    unknown = [name for name in metadata.input_names if name not in ROW_FIELDS and name not in widths]
    if unknown:
        raise ValueError(f"no fixed width for the sequence inputs {unknown}: add their limit here")
    return {name: widths[name] for name in metadata.input_names if name not in ROW_FIELDS}


def build_model_repository(export_dir: str | Path, out_dir: str | Path, name: str = "unirank",
                           max_batch_size: int = 64, dynamic_batching: bool = True, max_queue_delay_us: int = 0,
                           instance_count: int = 1, device: str = "cpu", ort_threads: int = 1,
                           flavours: tuple[str, ...] = FLAVOURS, preferred_batch_sizes: tuple[int, ...] = (),
                           graph_optimization: str = "ORT_ENABLE_ALL") -> dict[str, Path]:
    """Export dir (model.onnx, tokenizer.json, export.json) -> {flavour: repository root}; validated."""
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    tokenizer, queries = export_dir / TOKENIZER_FILE, export_dir / QUERIES_FILE
    spec = EndpointSpec(ExportMetadata.load(export_dir / METADATA_FILE), name, max_batch_size, dynamic_batching,
                        max_queue_delay_us, instance_count, device, ort_threads, list(preferred_batch_sizes),
                        graph_optimization, tokenizer_json=tokenizer.read_text() if tokenizer.exists() else "",
                        queries_json=queries.read_text() if queries.exists() else "")
    repositories = {}
    for flavour in flavours:
        root = out_dir / flavour
        model_dir = root / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        version_dir = model_dir / "1"
        version_dir.mkdir(parents=True)
        for graph_file in (MODEL_FILE, *external_data_files(export_dir / MODEL_FILE)):
            shutil.copy2(export_dir / graph_file, version_dir / graph_file)
        for extra in (TOKENIZER_FILE, METADATA_FILE, QUERIES_FILE, NEW_ITEMS_FILE):
            if (export_dir / extra).exists():
                shutil.copy2(export_dir / extra, model_dir / extra)
        if flavour == "python":
            shutil.copy2(_HERE / "model.py.tmpl", version_dir / "model.py")
            shutil.copy2(_HERE / "request_arrays.py", version_dir / "request_arrays.py")
            shutil.copy2(request_schema.__file__, version_dir / "request_schema.py")
            if (export_dir / INDEX_META_FILE).exists():  # two-stage: versioned with the model
                shutil.copy2(_HERE / "item_index.py", version_dir / "item_index.py")
                for extra in (CONTEXT_MODEL_FILE, *INDEX_FILES):
                    if (export_dir / extra).exists():
                        shutil.copy2(export_dir / extra, version_dir / extra)
        (model_dir / "config.pbtxt").write_text(text_format.MessageToString(model_config(spec, flavour)))
        validate_model_repository(root)
        repositories[flavour] = root
    return repositories


def read_model_config(path: str | Path) -> pb.ModelConfig:
    """Parses a config.pbtxt against Triton's schema (unknown fields, bad enums and types fail)."""
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except text_format.ParseError as err:
        raise InvalidModelRepository(f"{path}: {err}") from err


def validate_model_repository(root: str | Path) -> dict[str, pb.ModelConfig]:
    """Offline checks of every model in a repository: schema, layout, and names/dtypes/ranks against
    the ONNX graph. Returns {model name: config}; raises InvalidModelRepository listing all problems."""
    root = Path(root)
    model_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not model_dirs:
        raise InvalidModelRepository(f"{root}: no model directories")
    configs, problems = {}, []
    for model_dir in model_dirs:
        config_path = model_dir / "config.pbtxt"
        if not config_path.exists():
            problems.append(f"{model_dir.name}: missing config.pbtxt")
            continue
        try:
            config = read_model_config(config_path)
        except InvalidModelRepository as err:
            problems.append(str(err))
            continue
        problems += [f"{model_dir.name}: {p}" for p in _config_problems(config, model_dir)]
        configs[model_dir.name] = config
    if problems:
        raise InvalidModelRepository("invalid model repository:\n  " + "\n  ".join(problems))
    return configs


def _config_problems(config: pb.ModelConfig, model_dir: Path) -> list[str]:
    problems = []
    if config.name and config.name != model_dir.name:
        problems.append(f"config name {config.name!r} != directory name")
    if config.backend == "python":
        required = ["model.py", "request_arrays.py", "request_schema.py", MODEL_FILE]
    elif config.platform == "onnxruntime_onnx":
        required = [MODEL_FILE]
    else:
        return problems + [f"unsupported platform {config.platform!r} / backend {config.backend!r}"]
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        return problems + ["no numeric version directory"]
    for version in versions:
        two_stage = config.backend == "python" and (version / INDEX_META_FILE).exists()
        needed = required + ([CONTEXT_MODEL_FILE, INDEX_FILE, ITEM_TABLE_FILE, "item_index.py"] if two_stage else [])
        problems += [f"{version.name}/{f} missing" for f in needed if not (version / f).exists()]
        if (version / MODEL_FILE).exists():
            problems += [f"{version.name}/{f} missing (external data of {MODEL_FILE})"
                         for f in external_data_files(version / MODEL_FILE) if not (version / f).exists()]
            problems += _graph_problems(config, version / MODEL_FILE)
    return problems


def _graph_problems(config: pb.ModelConfig, onnx_path: Path) -> list[str]:
    """Config tensors vs ONNX graph: same names (both ways), dtypes and ranks (batch dim included)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    problems = []
    for kind, declared, actual in (("input", config.input, graph.input), ("output", config.output, graph.output)):
        onnx_tensors = {t.name: t.type.tensor_type for t in actual}
        names = [t.name for t in declared]
        if sorted(names) != sorted(onnx_tensors):
            problems.append(f"{kind} names {sorted(names)} != ONNX {sorted(onnx_tensors)}")
        for tensor in declared:
            if tensor.name not in onnx_tensors:
                continue
            onnx_type = onnx_tensors[tensor.name]
            dtype = pb.DataType.Name(tensor.data_type)
            if _ONNX_TO_TRITON.get(onnx_type.elem_type) != dtype:
                problems.append(f"{kind} {tensor.name}: {dtype} but ONNX elem_type {onnx_type.elem_type}")
            shape = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
            if config.backend == "python" and tensor.name in ROW_FIELDS:
                shape = []  # the python model squeezes [B, 1] to [B] (request_arrays.as_request)
            rank = len(shape) + (1 if config.max_batch_size > 0 else 0)
            if rank != len(onnx_type.shape.dim):
                problems.append(f"{kind} {tensor.name}: rank {rank} but ONNX rank {len(onnx_type.shape.dim)}")
            onnx_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in onnx_type.shape.dim][-len(shape):] if shape else []
            for declared_dim, onnx_dim in zip(shape, onnx_dims):
                if declared_dim != -1 and onnx_dim != -1 and declared_dim != onnx_dim:
                    problems.append(f"{kind} {tensor.name}: dims {shape} but ONNX dims {onnx_dims}")
                    break
    return problems
