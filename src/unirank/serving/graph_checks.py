"""The request contract (model/request.py RULES) built into the exported ONNX graph, so that a
server running the bare graph (the official container's onnxruntime backend) refuses the same
requests as the python flavour.

The inputs' batch sizes are checked first (every input has task's number of rows), then RULES.
ONNX has no assert: each broken rule makes a one-element Gather read index 1, and ONNX Runtime fails
with "... Gather node. Name:'<field>: <message>' Status Message: indices element out of data
bounds". The checks are chained (rule i runs after rule i-1 passed, so the first broken rule is the
one reported) and every graph input passes through the chain's result (+0), so nothing of the model
runs before the checks. History and query are then cut to the model's limits: padding beyond them
carries nothing (the python flavour drops it too).
"""
from __future__ import annotations

from pathlib import Path

from unirank.model.request import RULES, SEQUENCE_LIMITS, Rule
from unirank.serving.request_arrays import RequestLimits, rule_message

CHECKED = "__checked"
BATCH_MISMATCH = "batch dimension != task's"  # request_arrays.as_request's check, without the numbers


def add_request_checks(path: str | Path, limits: RequestLimits) -> None:
    """Rewrites the ONNX file at `path` in place."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)  # external weights stay in their file
    graph = model.graph
    inputs = [i.name for i in graph.input]
    nodes = [_const("rc_zero_1", [0]), _const("rc_zero", 0), _const("rc_one", 1), _const("rc_axis1", [1]), _const("rc_minus_1", [-1])]
    guard = "rc_zero_1"
    checks = [(f"rows_{name}", name, BATCH_MISMATCH, _batch_mismatch(name)) for name in inputs if name != "task"]
    checks += [(i, rule.field, rule_message(rule, limits), _broken(rule, i, limits)) for i, rule in enumerate(RULES)]
    for i, field, message, (broken, check_nodes) in checks:
        index = f"rc_check{i}_index"
        nodes += check_nodes + [helper.make_node("Cast", [broken], [f"{index}_s"], to=TensorProto.INT64),
                                helper.make_node("Unsqueeze", [f"{index}_s", "rc_zero_1"], [index])]
        out = f"rc_check{i}_guard"
        nodes.append(helper.make_node("Gather", [guard, index], [out], name=f"{field}: {message}"))
        guard = out
    for name in inputs:
        source = f"{name}{CHECKED}_full" if name in SEQUENCE_LIMITS else f"{name}{CHECKED}"
        nodes.append(helper.make_node("Add", [name, guard], [source]))
    for sequence, limit in SEQUENCE_LIMITS.items():
        nodes += [_const(f"{sequence}_limit", [limits.resolve(limit)]),
                  helper.make_node("Slice", [f"{sequence}{CHECKED}_full", "rc_zero_1", f"{sequence}_limit", "rc_axis1"],
                                   [f"{sequence}{CHECKED}"])]
    for node in graph.node:
        node.input[:] = [f"{n}{CHECKED}" if n in inputs else n for n in node.input]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))


def _const(name: str, value) -> "onnx.NodeProto":  # noqa: F821
    from onnx import TensorProto, helper

    dims = [len(value)] if isinstance(value, list) else []
    values = value if isinstance(value, list) else [value]
    tensor = helper.make_tensor(name, TensorProto.INT64, dims, [int(v) for v in values])
    return helper.make_node("Constant", [], [name], value=tensor)


def _any(mask: str, out: str) -> list:
    """A bool scalar: any element of `mask` true (an empty mask gives false)."""
    from onnx import TensorProto, helper

    return [helper.make_node("Cast", [mask], [f"{out}_i"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", [f"{out}_i"], [f"{out}_sum"], keepdims=0),
            helper.make_node("Greater", [f"{out}_sum", "rc_zero"], [out])]


def _batch_mismatch(field: str) -> tuple[str, list]:
    """(bool scalar name, nodes): true when `field` has another number of rows than task. Checked
    first: ONNX Runtime divided by zero (SIGFPE) on 0-row candidates beside 1-row inputs."""
    from onnx import helper

    p = f"rc_rows_{field}"
    return f"{p}_broken", [helper.make_node("Shape", [field], [f"{p}_shape"], end=1),
                           helper.make_node("Shape", ["task"], [f"{p}_task_shape"], end=1),
                           helper.make_node("Equal", [f"{p}_shape", f"{p}_task_shape"], [f"{p}_same1"]),
                           helper.make_node("Squeeze", [f"{p}_same1", "rc_zero_1"], [f"{p}_same"]),
                           helper.make_node("Not", [f"{p}_same"], [f"{p}_broken"])]


def _width(field: str, out: str) -> list:
    from onnx import helper

    return [helper.make_node("Shape", [field], [f"{out}_shape"]),
            helper.make_node("Gather", [f"{out}_shape", "rc_one"], [out], axis=0)]


def _broken(rule: Rule, i: int, limits: RequestLimits) -> tuple[str, list]:
    """(bool scalar name, nodes): true when the request breaks the rule."""
    from onnx import TensorProto, helper

    p, field, out = f"rc_check{i}", rule.field, f"rc_check{i}_broken"
    bound = limits.resolve(rule.bound)
    if rule.kind == "batch":
        return out, [helper.make_node("Shape", [field], [f"{p}_shape"]),
                     helper.make_node("Gather", [f"{p}_shape", "rc_zero"], [f"{p}_rows"], axis=0),
                     helper.make_node("Less", [f"{p}_rows", "rc_one"], [out])]
    if rule.kind == "width_at_most":
        return out, [_const(f"{p}_bound", bound), *_width(field, f"{p}_width"),
                     helper.make_node("Greater", [f"{p}_width", f"{p}_bound"], [out])]
    if rule.kind == "set_for_task":
        nodes = [_const(f"{p}_task", bound), helper.make_node("Equal", ["task", f"{p}_task"], [f"{p}_rows"]),
                 helper.make_node("Equal", [field, "rc_zero"], [f"{p}_unset"]),
                 helper.make_node("And", [f"{p}_rows", f"{p}_unset"], [f"{p}_mask"])]
    elif rule.kind == "one_of":
        nodes = [_const(f"{p}_values", list(bound)),
                 helper.make_node("Unsqueeze", [field, "rc_minus_1"], [f"{p}_column"]),
                 helper.make_node("Equal", [f"{p}_column", f"{p}_values"], [f"{p}_equal"]),
                 helper.make_node("Cast", [f"{p}_equal"], [f"{p}_equal_i"], to=TensorProto.INT64),
                 helper.make_node("ReduceMax", [f"{p}_equal_i", "rc_minus_1"], [f"{p}_found"], keepdims=0),
                 helper.make_node("Equal", [f"{p}_found", "rc_zero"], [f"{p}_mask"])]
    elif rule.kind in ("at_least", "at_most"):
        op = "Less" if rule.kind == "at_least" else "Greater"
        nodes = [_const(f"{p}_bound", bound), helper.make_node(op, [field, f"{p}_bound"], [f"{p}_mask"])]
    elif rule.kind == "within_width":
        nodes = [*_width(bound, f"{p}_width"), helper.make_node("Greater", [field, f"{p}_width"], [f"{p}_mask"])]
    else:
        raise ValueError(f"unknown rule kind {rule.kind!r}")
    return out, nodes + _any(f"{p}_mask", out)
