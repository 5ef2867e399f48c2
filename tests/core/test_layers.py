"""Imports run one way (docs/ARCHITECTURE.md, "Package map"): a module may import its own layer or a
lower one, never a higher one, and no unirank import is made inside a function to hide a cycle: the
few function-level imports kept are listed in DEFERRED, each with its reason."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "unirank"

# longest matching prefix wins
LAYERS = {
    "model.request": 0, "config": 0, "atomic_file": 0, "kernels": 0,
    "model": 1, "data": 2, "evaluation": 3, "training": 4, "serving": 5, "experiments": 6, "cli": 7,
}

# module -> reason for its function-level unirank imports (none of them hides a cycle)
DEFERRED = {
    "cli.main": "each subcommand imports its layer when it runs: `unirank --help` and the light "
                "commands do not pay for torch, TorchRec and ONNX",
    "cli.quickstart": "the serving stack (tritonclient, onnx) is an optional extra",
    "kernels.attention": "the Triton kernel needs the optional `triton` package; the reference path does not",
    "kernels.embedding_bag": "the Triton kernel needs the optional `triton` package; the reference path does not",
    "kernels.attention.benchmark": "benchmarks import the Triton kernels only on the machine that times them",
    "kernels.embedding_bag.benchmark": "benchmarks import the Triton kernels only on the machine that times them",
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def unirank_imports(node: ast.AST) -> list[tuple[int, str]]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unirank."):
        base = node.module.removeprefix("unirank.")
        # `from unirank.training import sharded_checkpoint` names the module in `names`
        return [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    if isinstance(node, ast.Import):
        return [(node.lineno, a.name.removeprefix("unirank.")) for a in node.names if a.name.startswith("unirank.")]
    return []


def function_level_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                found += unirank_imports(node)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def modules() -> list[tuple[str, ast.AST, Path]]:
    paths = [p for p in sorted(PACKAGE.rglob("*.py")) if p.parent != PACKAGE]  # not the empty top-level __init__
    return [(module_name(p), ast.parse(p.read_text(), filename=str(p)), p) for p in paths]


def test_imports_run_one_way():
    wrong = []
    for name, tree, path in modules():
        own = layer(name)
        for line, target in (found for node in ast.walk(tree) for found in unirank_imports(node)):
            if layer(target) > own:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports unirank.{target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_function_level_import_outside_the_listed_reasons():
    hidden = [f"{path.relative_to(PACKAGE)}:{line} imports unirank.{target}"
              for name, tree, path in modules() if name not in DEFERRED
              for line, target in function_level_imports(tree)]
    assert not hidden, "function-level imports (move them to the top, or list the module in DEFERRED " \
                       "with its reason):\n" + "\n".join(sorted(set(hidden)))


def test_deferred_list_is_current():
    names = {name for name, tree, _ in modules() if function_level_imports(tree)}
    assert set(DEFERRED) <= names, f"DEFERRED lists modules without function-level imports: {set(DEFERRED) - names}"


def test_layer_table_knows_every_module():
    for name, _, _ in modules():
        layer(name)  # KeyError names a module outside the map
