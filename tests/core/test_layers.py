"""Imports run one way: request schema <- model <- data <- evaluation's ranking path <- training <-
evaluation's reports <- serving <- CLI (docs/ARCHITECTURE.md). A module may import its own layer or a
lower one, never a higher one, at module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
REPO = SRC / "unirank"
PACKAGES = ("model", "kernels", "data", "evaluation", "training", "serving", "cli")

# longest matching prefix wins
LAYERS = {
    "kernels": 0, "model.request": 0, "model": 1, "data": 2,
    "evaluation.metrics": 3, "evaluation.evaluate": 3, "evaluation.baselines": 3,
    "training": 4, "evaluation": 5, "serving": 6, "cli": 7,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unirank."):
            base = node.module.removeprefix("unirank.")
            # `from unirank.training import sharded_checkpoint` names the module in `names`
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.removeprefix("unirank.")) for a in node.names
                      if a.name.startswith("unirank.")]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_imports_run_one_way():
    wrong = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            own = layer(module_name(path))
            for line, target in imports(path):
                if layer(target) > own:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports unirank.{target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_layer_table_knows_every_module():
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            layer(module_name(path))  # KeyError names a module outside the map
