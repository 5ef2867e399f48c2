"""What the server, client and model repository know about an exported graph: its file names,
output names and limits. Standard library only (onnx on demand), so that the client imports no torch."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

OUTPUT_NAMES = ["item_ids", "scores"]
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "export.json"
NEW_ITEMS_FILE = "new_items.json"  # items added after training (serving/new_items.py): served id <-> external id
QUERIES_FILE = "queries.json"  # the suggest task's query catalogue: a JSON list, query id = position + 1
# Model config parameters that carry the metadata, the tokenizer and the query catalogue to clients.
METADATA_PARAMETER, TOKENIZER_PARAMETER, QUERIES_PARAMETER = "export_metadata", "tokenizer", "queries"


@dataclass
class ExportMetadata:
    """What the server, client and model repository need to know about an exported graph."""

    num_items: int
    max_history: int
    max_query_len: int
    top_k: int
    input_names: list[str]
    output_names: list[str]
    onnx_opset: int
    num_queries: int = 0  # the query catalogue's size: > 0 = suggest rows are answered with query ids

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ExportMetadata":
        return cls(**json.loads(Path(path).read_text()))


def external_data_file(model_file: str) -> str:
    """The file torch.onnx writes a graph's external weights to, beside the graph."""
    return f"{model_file}.data"


def external_data_files(path: str | Path) -> list[str]:
    """Names (relative to the graph's directory) of the external data files a graph reads."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
             for entry in tensor.external_data if entry.key == "location"}
    return sorted(names)
