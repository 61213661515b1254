"""Gated-MLP analysis for the MLP-aware up-projection Hessian: up_proj, the activation it is multiplied by, the
down projection it feeds and the linear map between them (empty, or the online Hadamard of --rotate)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layers import block_index, linear_layers
from .attention import GraphIndex

_PATH_OPS = {"Reshape", "MatMul"}  # what may sit between the gated product and the down projection (besides Shape)


@dataclass
class GatedMlp:
    """One gated MLP, down(act(gate(x)) * up(x)): the layers and tensors the up-projection Hessian needs."""

    block: int | None
    up: str  # up projection node
    down: str  # down projection node
    act: str  # the tensor multiplying up's output elementwise, [..., d_ff]
    product: str  # act * up, [..., d_ff]
    down_input: str  # what the down projection reads: the product, or its online rotation
    path: list[onnx.NodeProto] = field(default_factory=list, repr=False)  # nodes from product to down_input


def gated_mlps(model: onnx.ModelProto) -> list[GatedMlp]:
    """Every linear layer whose output is multiplied elementwise by a non-constant tensor on the way into exactly
    one other linear layer (through reshapes and constant MatMuls only): the up projections of gated MLPs."""
    g = GraphIndex(model)
    layers = [l for l in linear_layers(model) if l.role != "rotation"]  # --rotate's online Hadamards are path
    reader = {l.input: l for l in layers}
    found = []
    for out, layer in g.layer_outputs(layers).items():
        node = layer.node
        uses = g.consumers.get(out, [])
        if len(uses) != 1 or uses[0].op_type != "Mul" or len(uses[0].input) != 2:
            continue
        mul = uses[0]
        act = mul.input[1] if mul.input[0] == out else mul.input[0]
        if g.is_const(act) or act == out:
            continue
        down = _down_input(g, mul.output[0], reader)
        if down is not None and reader[down[0]].node != node:
            found.append(GatedMlp(block_index(node), node, reader[down[0]].node, act, mul.output[0], *down))
    return found


def _down_input(g: GraphIndex, product: str, reader: dict) -> tuple[str, list[onnx.NodeProto]] | None:
    """(input tensor of the one linear layer `product` reaches through reshapes / constant MatMuls, the nodes on the
    way including the Shape reads that feed them), or None."""
    path, t = [], product
    for _ in range(16):
        if t in reader:
            return t, path
        shapes = [n for n in g.consumers.get(t, []) if n.op_type == "Shape"]
        data = [n for n in g.consumers.get(t, []) if n.op_type != "Shape"]
        if len(data) != 1 or data[0].op_type not in _PATH_OPS or any(n is data[0] for n in path):
            return None
        n = data[0]
        if n.op_type == "MatMul" and not (n.input[0] == t and g.is_const(n.input[1])) and not (
                n.input[1] == t and g.is_const(n.input[0])):
            return None
        path += [*shapes, n]
        t = n.output[0]
    return None


def product_map(model: onnx.ModelProto, mlp: GatedMlp, d_ff: int, read) -> np.ndarray | None:
    """P [d_ff, d_ff] with down_input = product @ P, or None where the down projection reads the product itself:
    the nodes between them run in ONNX Runtime on an identity batch. `read(tensor_proto)` gives initializer data."""
    import onnxruntime as ort

    if not mlp.path:
        return None
    consts = {i for n in mlp.path for i in n.input}
    inits = [numpy_helper.from_array(np.asarray(read(x)), x.name) for x in model.graph.initializer if x.name in consts]
    piece = helper.make_model(
        helper.make_graph(mlp.path, "product_map", [helper.make_tensor_value_info(mlp.product, onnx.TensorProto.FLOAT, [1, d_ff, d_ff])],
                          [helper.make_tensor_value_info(mlp.down_input, onnx.TensorProto.FLOAT, None)], inits),
        opset_imports=list(model.opset_import))
    piece.ir_version = model.ir_version
    session = ort.InferenceSession(piece.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([mlp.down_input], {mlp.product: np.eye(d_ff, dtype=np.float32)[None]})[0][0]
