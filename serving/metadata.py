"""What the server, client and model repository know about an exported graph: its file names,
output names and limits. Standard library only, so that the client imports no torch."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

OUTPUT_NAMES = ["item_ids", "scores"]
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "export.json"
# Model config parameters that carry the metadata and the tokenizer to clients.
METADATA_PARAMETER, TOKENIZER_PARAMETER = "export_metadata", "tokenizer"


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

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ExportMetadata":
        return cls(**json.loads(Path(path).read_text()))
