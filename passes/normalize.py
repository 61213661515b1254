"""Normalize linear layers: each becomes MatMul(X, W[K, N]) with W a constant initializer."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from onnxq.errors import OnnxqError
from onnxq.io import restore_weights, strip_weights

LINEAR_OPS = ("MatMul", "Gemm")


def normalize(model: onnx.ModelProto, *, keep_tied: bool = False) -> onnx.ModelProto:
    """Make every linear layer MatMul(X, initializer W[K, N]), in place (weights must be loaded); returns `model`.

    Constant/Transpose-fed weights become initializers under the name of the tensor they replace. Gemm (transA=0)
    becomes MatMul (+ Add for C), transB/alpha folded into W and beta into a constant C, named "…/Gemm" -> "…/MatMul".
    Other Gemms (transA=1, non-constant B, non-constant C with beta != 1) stay. Node names are kept (unnamed linear
    nodes get one); unused initializers are dropped; shape inference runs once. With `keep_tied`, a weight that is a
    Transpose of an initializer other nodes also read (a tied LM head) stays shared instead of being copied.
    """
    graph = model.graph
    names = Names(graph)
    inits = {t.name: t for t in graph.initializer}
    _materialize_weights(graph, inits, keep_tied)
    nodes = []
    for node in graph.node:
        if node.op_type in LINEAR_OPS and not node.name:
            node.name = names.unique(f"/{node.op_type}")
        nodes.extend(_gemm_to_matmul(graph, node, inits, names) if node.op_type == "Gemm" else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    remove_unused(graph)
    return infer_shapes(model)


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop initializers and Constant nodes nobody reads, with their graph-input and value_info entries."""
    used = set(_used_names(graph))
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    gone = {t.name for t in graph.initializer if t.name not in used}
    for field in (graph.initializer, graph.input, graph.value_info):
        for item in [x for x in field if x.name in gone]:
            field.remove(item)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ONNX shape inference and store its value_info in `model` (weights detached, so any size works)."""
    payloads = strip_weights(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        restore_weights(model, payloads)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _materialize_weights(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], keep_tied: bool) -> None:
    """Turn constant MatMul/Gemm inputs B and C that a Constant or Transpose node produces into initializers."""
    producers = {out: n for n in graph.node for out in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    for node in list(graph.node):
        if node.op_type not in LINEAR_OPS:
            continue
        for name in node.input[1:3]:
            src = producers.get(name)
            if keep_tied and src is not None and src.op_type == "Transpose" and readers.get(src.input[0], 0) > 1:
                continue
            value = None if not name or name in inits else _constant(name, inits, producers)
            if value is not None:
                graph.node.remove(producers.pop(name))
                inits[name] = numpy_helper.from_array(value, name)
                graph.initializer.append(inits[name])


def _constant(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> np.ndarray | None:
    """The value of tensor `name` if it is an initializer, a Constant, or a Transpose of one; else None."""
    if name in inits:
        return _array(inits[name])
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant" and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    if node.op_type == "Transpose":
        value = _constant(node.input[0], inits, producers)
        perm = _attrs(node).get("perm")
        return None if value is None else np.ascontiguousarray(np.transpose(value, perm))
    return None


def _gemm_to_matmul(
    graph: onnx.GraphProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], names: Names
) -> list[onnx.NodeProto]:
    """[MatMul] or [MatMul, Add] equal to Gemm `node`; [node] when it is not a linear layer we can rewrite."""
    a = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0} | _attrs(node)
    b_name, c_name = node.input[1], node.input[2] if len(node.input) > 2 else ""
    dynamic_scaled_c = c_name and a["beta"] != 1 and c_name not in inits
    if a["transA"] or b_name not in inits or len(inits[b_name].dims) != 2 or dynamic_scaled_c:
        return [node]
    mm_name = names.unique(renamed(node.name, "MatMul"))
    weight = b_name
    if a["transB"] or a["alpha"] != 1:
        w = _array(inits[b_name])
        w = np.ascontiguousarray(w.T if a["transB"] else w) * np.asarray(a["alpha"], w.dtype)
        weight = _add_initializer(graph, inits, names.unique(f"{mm_name}.weight"), w)
    if not c_name:
        return [helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=mm_name)]
    if a["beta"] != 1:
        c = _array(inits[c_name])
        c_name = _add_initializer(graph, inits, names.unique(f"{mm_name}.bias"), c * np.asarray(a["beta"], c.dtype))
    mm_out = names.unique(f"{mm_name}_output_0")
    return [
        helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=mm_name),
        helper.make_node("Add", [mm_out, c_name], list(node.output), name=names.unique(renamed(node.name, "Add"))),
    ]


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    if uses_external_data(tensor):
        raise OnnxqError(f"weight {tensor.name!r} is not loaded: load the model with load_weights=True to normalize it")
    return numpy_helper.to_array(tensor)


def _add_initializer(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> str:
    inits[name] = numpy_helper.from_array(value, name)
    graph.initializer.append(inits[name])
    return name


def renamed(name: str, op: str, old: str = "Gemm") -> str:
    """A node name for `op` derived from node `name` of op `old`: "/x/Gemm_1" -> "/x/MatMul_1", "w" -> "w/MatMul"."""
    head, _, last = name.rpartition("/")
    return f"{head}/{op}{last[len(old):]}" if last.startswith(old) else f"{name}/{op}"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and, recursively, those of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from all_nodes(sub)


def _used_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every tensor name read by a node (subgraphs included) or exposed as a graph output."""
    yield from (o.name for o in graph.output)
    for node in all_nodes(graph):
        yield from node.input


class Names:
    """Fresh node and tensor names that do not collide with the graph's."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {n.name for n in graph.node} | {t.name for t in graph.initializer}
        self.taken |= {x for n in graph.node for x in n.output} | {v.name for v in graph.input}

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name
